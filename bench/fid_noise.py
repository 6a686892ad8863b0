"""FID's sampling noise: one checkpoint, sampled with K different seeds, each evaluated the same way.

    python -m bench.fid_noise --ckpt CKPT --reference REF [--feature-network NET | --inception-weights W] [--seeds 5] [--num-samples N]

Prints each FID, their mean and standard deviation, and the promote margin that this noise
suggests: 3 standard deviations of one FID (the difference of two evaluations of equal models
has sqrt(2) times the spread, so a noise-only "improvement" passes a 3-sigma margin in about
1.7% of comparisons, one-sided normal). The spread shrinks about as 1/sqrt(samples): measure at
the sample count the pipeline evaluates with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from erw.cli import main


def run(argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise SystemExit(f"erw {' '.join(argv)} failed with {code}")


def fid_noise(ckpt: str, reference: str, evaluator: list[str], seeds: int, num_samples: int | None) -> list[float]:
    fids = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):  # seed 0 is the one the pipeline samples with
            samples, out = Path(tmp, f"s{seed}"), Path(tmp, f"e{seed}")
            extra = ["--num-samples", str(num_samples)] if num_samples else []
            run(["sample", "--ckpt", ckpt, "--out", str(samples), "--seed", str(seed), *extra])
            run(["evaluate", "--samples", str(samples), "--reference", reference, "--out", str(out), *evaluator])
            fids.append(json.loads((out / "metrics.json").read_text())["fid"])
    return fids


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--feature-network", default="", help="a small evaluator network instead of Inception")
    parser.add_argument("--inception-weights", default="", help="torch-fidelity Inception weights (default: download)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=None, help="default: the checkpoint's sample.num_samples")
    args = parser.parse_args()
    evaluator = [
        f"--{flag}={value}"
        for flag, value in (("feature-network", args.feature_network), ("inception-weights", args.inception_weights))
        if value
    ]
    fids = fid_noise(args.ckpt, args.reference, evaluator, args.seeds, args.num_samples)
    mean, std = statistics.mean(fids), statistics.stdev(fids)
    print("FID per sampling seed: " + ", ".join(f"{f:.3f}" for f in fids))
    print(f"mean {mean:.3f}  std {std:.3f}  ({std / mean:.1%} of the mean)  suggested --margin {3 * std:.3f}")
