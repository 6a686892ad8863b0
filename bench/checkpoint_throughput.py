"""What a checkpoint costs the training loop: synchronous vs asynchronous writes, as ratios.

    python -m bench.checkpoint_throughput [--config PRESET] [key=value ...] [--arch SiT-S/2]
                                          [--segment 8] [--rounds 3] [--out DIR]

Runs the trainer's step (erw.training.step.train_step, fp32 on the CPU, the preset's precision with
--device cuda) and its checkpoint writer
(erw.training.async_checkpoint.CheckpointWriter) on this machine, in segments of --segment steps:

    none    no checkpoint
    sync    one checkpoint in the middle of the segment, written before training goes on
    async   the same checkpoint handed to the background writer; training goes on at once (the
            segment ends by waiting for the write, so a write longer than the rest of the segment
            still counts)

The segments take turns for --rounds rounds, so drifting load hits them alike. The cost of a
checkpoint is the extra wall time of a segment over `none`, in seconds and in steps; the headline
is async cost / sync cost. Checkpoints go to --out (default: a temporary folder on local disk).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from erw.config import load_config, validate
from erw.models.encoders import ENCODERS
from erw.training.async_checkpoint import CheckpointWriter
from erw.training.distributed import Dist
from erw.training.step import TrainState, train_step
from erw.training.trainer import build_model, build_objective

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "imagenet256-sit-xl2.yaml"), help="preset")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--arch", default="SiT-S/2", help="model to time in place of the preset's")
    parser.add_argument("--batch", type=int, default=4, help="samples per optimizer step")
    parser.add_argument("--segment", type=int, default=8, help="steps per timed segment (one checkpoint each)")
    parser.add_argument("--rounds", type=int, default=3, help="segments per variant")
    parser.add_argument("--out", default="", help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the state is staged from it to CPU memory)")
    args = parser.parse_args(argv)
    cfg = validate(
        load_config(
            args.config,
            [
                f"model.arch={args.arch}",
                "model.align_depth=8",
                f"train.batch_size={args.batch}",
                *([] if args.device.startswith("cuda") else ["train.precision=fp32"]),
                *args.overrides,
            ],
        )
    )
    device = torch.device(args.device)
    p = cfg.train
    spec = ENCODERS[cfg.encoder.name]
    torch.manual_seed(0)
    state = TrainState.create(build_model(cfg, "train", spec.dim).to(device), p, device)
    objective = build_objective(cfg, "train", 0)
    size, channels, micro = cfg.data.latent_size, cfg.data.latent_channels, args.batch // p.grad_accum
    item = {
        "latent": torch.randn(micro, channels, size, size, device=device),
        "label": torch.randint(0, cfg.model.num_classes, (micro,), device=device),
        "feat": torch.randn(micro, spec.num_tokens(cfg.data.resolution), spec.dim, device=device),
    }
    batches = iter(lambda: item, None)
    one_process = Dist(rank=0, local_rank=0, world_size=1, device=device)

    def step() -> None:
        train_step(state, batches, objective, p, seed=cfg.seed, dist_state=one_process, encoder=torch.nn.Identity())
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        writers = {
            "sync": CheckpointWriter(f"{out}/sync", keep_last=1, asynchronous=False, log=lambda _: None),
            "async": CheckpointWriter(f"{out}/async", keep_last=1, asynchronous=True, log=lambda _: None),
        }

        def segment(variant: str) -> float:
            started = time.perf_counter()
            for i in range(args.segment):
                step()
                if variant != "none" and i == args.segment // 2 - 1:
                    writers[variant].submit(state, phase="train", config=cfg, extra_meta={})
            if variant != "none":
                writers[variant].wait()
            return time.perf_counter() - started

        segment("none")  # warm-up: allocator, first optimizer state
        segment("sync")
        times: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
        for _ in range(args.rounds):
            for variant in times:
                times[variant].append(segment(variant))
        write_seconds = writers["sync"].last_seconds or 0.0
        checkpoint_bytes = sum(f.stat().st_size for f in Path(out, "sync").rglob("*") if f.is_file())

    median = {variant: statistics.median(values) for variant, values in times.items()}
    step_seconds = median["none"] / args.segment
    cost = {variant: median[variant] - median["none"] for variant in ("sync", "async")}
    print(
        f"checkpoint cost, {device}, {torch.get_num_threads()} threads, {args.arch} {p.precision} batch {args.batch}: "
        f"{checkpoint_bytes / 2**20:.0f} MiB per checkpoint, one write {write_seconds:.2f}s, one step "
        f"{step_seconds:.3f}s; median of {args.rounds} segments of {args.segment} steps"
    )
    print("variant | segment s | checkpoint cost s | cost in steps")
    print(f"none | {median['none']:.2f} | - | -")
    for variant in ("sync", "async"):
        print(f"{variant} | {median[variant]:.2f} | {cost[variant]:.2f} | {cost[variant] / step_seconds:.2f}")
    ratio = cost["async"] / cost["sync"] if cost["sync"] > 0 else float("nan")
    print(f"async/sync checkpoint cost: {ratio:.2f} (segment time async/sync: {median['async'] / median['sync']:.3f})")


if __name__ == "__main__":
    main()
