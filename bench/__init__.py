"""Benchmarks and the small-scale proof study: research code that drives the product (erw) and is
never imported by it. Run each as a module from the repository root, e.g. `python -m bench.convergence`;
the studies need the `bench` extra (matplotlib): `pip install -e '.[bench]'`."""
