"""The ERW Kubeflow pipeline: the DAG, its parameters, compilation, submission and the local run.

Nothing in `erw` imports this package; `erw pipeline ...` reaches it through lazy imports.
"""
