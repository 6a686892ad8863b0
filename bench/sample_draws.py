"""What keying the objective's draws by position in the global batch costs a rank, on this CPU.

    python -m bench.sample_draws [--global-batch 256] [--ranks 32] [--arch SiT-B/2] [--rounds 12]

Since erw.draws, every rank draws each per-sample stream for the whole global batch G
(noise G x 4x32x32, time G, label drop G) from a (seed, step, stream) generator and takes the
rows of its samples, so that the draws do not depend on the world size. Before, a rank drew only
its own micro-batch from its (seed, rank, step) stream. Side by side, one step at a time:

    keyed      StepDraws for G, rows of one micro-batch of G / ranks (what a rank does now)
    per rank   the micro-batch's draws only, from the global RNG (before)
    step       the trainer's train_step of --arch on that micro-batch (fp32, CPU, one process)

and the extra cost of keyed over per rank as a share of the step. On a GPU the tables are drawn
on the device (4 MiB of noise for G = 256): not measured here.
"""

from __future__ import annotations

import argparse

import torch

from bench.step_throughput import ROOT, make_step, race
from erw.config import load_config, validate
from erw.draws import GeneratorDraws, StepDraws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--arch", default="SiT-B/2")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    cfg = validate(
        load_config(
            ROOT / "configs" / "imagenet256-sit-xl2.yaml",
            [
                f"model.arch={args.arch}",
                "model.align_depth=8",
                "train.precision=fp32",
                "warmup.precision=fp32",
            ],
        )
    )
    micro, shape = (
        args.global_batch // args.ranks,
        (cfg.data.latent_channels, cfg.data.latent_size, cfg.data.latent_size),
    )
    positions = torch.arange(micro)
    step_counter = iter(range(10**9))

    def draw(draws) -> None:
        draws.uniform("time")
        draws.normal("noise", shape)
        draws.uniform("label_drop")

    def keyed() -> None:
        draw(StepDraws(cfg.seed, next(step_counter), args.global_batch, "cpu").at(positions))

    def per_rank() -> None:
        draw(GeneratorDraws(micro, "cpu"))

    s = race({"keyed": keyed, "per rank": per_rank, "step": make_step(cfg, "train", micro)}, args.rounds)
    print(
        f"per-sample draws, CPU, {torch.get_num_threads()} threads: global batch {args.global_batch} of "
        f"{'x'.join(map(str, shape))} latents, {args.ranks} ranks (micro-batch {micro}), {args.arch} fp32 step, "
        f"{args.rounds} rounds, median"
    )
    print(
        f"keyed {1e3 * s['keyed']:.2f} ms | per rank {1e3 * s['per rank']:.3f} ms | step {1e3 * s['step']:.0f} ms | "
        f"keyed/per rank {s['keyed'] / s['per rank']:.1f}x | extra cost of keyed draws per step "
        f"{100 * (s['keyed'] - s['per rank']) / s['step']:.2f}% of the step"
    )


if __name__ == "__main__":
    main()
