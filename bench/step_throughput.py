"""Training throughput on this machine, as ratios measured side by side in one run.

    python -m bench.step_throughput [--config PRESET] [key=value ...] [--archs SiT-S/2,SiT-B/2]
                                    [--batch 8] [--rounds 12] [--no-compile]

Times the trainer's own step (erw.training.step.train_step) with the preset's phase settings
(grad accumulation, clipping, EMA decay, AdamW betas, fused switch; fp32 on the CPU unless
train.precision=... is given), on random latents and cached-feature alignment targets of the
preset's encoder shape. Per model:

    eager samples/s            the trainer's step as configured
    compiled/eager             the same step under torch.compile
    warmup/full step time      an ERW warmup step (first l2r_depth blocks at t = 0) vs a full step
    per-tensor EMA             the EMA updated one tensor at a time (before: torch._foreach_lerp_)
    fused AdamW                train.fused_optimizer=true (on CPU the default is off)
    sync per micro-batch       every loss term read to the host after every micro-batch (before)

The last three are step-time ratios against the trainer's step (> 1: slower than the trainer's
step). All variants of a model take turns, one step each, for --rounds rounds, and the median
step time of each is compared, so drifting load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from erw.config import Config, load_config, validate
from erw.models.encoders import ENCODERS
from erw.training.step import TrainState, train_step
from erw.training.trainer import build_model, build_objective

ROOT = Path(__file__).resolve().parents[1]


class PerTensorEma(TrainState):
    """The EMA update as it was before: one lerp_ per tensor."""

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for e, p in zip(*self._ema_pairs):
            e.lerp_(p, 1.0 - decay)


class SyncEveryMicroBatch:
    """The objective with the old accumulation loop's host reads: float() of each term, each micro-batch."""

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, *args, **kwargs):
        loss, logs = self.objective(*args, **kwargs)
        for value in (loss, *logs.values()):
            float(value.detach())
        return loss, logs


def synthetic_batches(cfg: Config, batch: int, tokens: int, dim: int):
    """Random latents, labels and cached encoder tokens, forever (the same tensors each time)."""
    size, channels = cfg.data.latent_size, cfg.data.latent_channels
    item = {
        "latent": torch.randn(batch, channels, size, size),
        "label": torch.randint(0, cfg.model.num_classes, (batch,)),
        "feat": torch.randn(batch, tokens, dim),
    }
    while True:
        yield item


def make_step(
    cfg: Config, phase: str, batch: int, *, state_type=TrainState, wrap=None, compiled=False
) -> Callable[[], None]:
    """One call = one train_step of `phase` exactly as the trainer takes it (CPU, one process)."""
    spec = ENCODERS[cfg.encoder.name]
    p = getattr(cfg, phase)
    torch.manual_seed(0)
    model = build_model(cfg, phase, spec.dim)
    state = state_type.create(model, p, torch.device("cpu"))
    objective = build_objective(cfg, phase, 0)
    objective = wrap(objective) if wrap else objective
    net = torch.compile(model) if compiled else model
    batches = synthetic_batches(cfg, batch // p.grad_accum, spec.num_tokens(cfg.data.resolution), spec.dim)

    def step() -> None:
        train_step(state, batches, objective, p, seed=cfg.seed, net=net, encoder=torch.nn.Identity())

    return step


def race(steps: dict[str, Callable[[], None]], rounds: int, warmup_calls: int = 2) -> dict[str, float]:
    """Median seconds per step of each variant, taking turns one step at a time."""
    for step in steps.values():  # warm-up: allocator, and compilation for the compiled variant
        for _ in range(warmup_calls):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "imagenet256-sit-xl2.yaml"), help="preset")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--archs", default="SiT-S/2,SiT-B/2", help="models to time in place of the preset's")
    parser.add_argument("--batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--rounds", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()
    rows = []
    for arch in args.archs.split(","):
        # align_depth 8 fits the 12-block S and B models (the preset's 14 is for XL's 28 blocks);
        # fp32 because bf16 autocast on a CPU is emulated and ~5x slower (train.precision=bf16 to time it).
        base = [
            f"model.arch={arch}",
            "model.align_depth=8",
            f"train.batch_size={args.batch}",
            f"warmup.batch_size={args.batch}",
            "train.precision=fp32",
            "warmup.precision=fp32",
            *args.overrides,
        ]
        cfg = validate(load_config(args.config, base))
        fused = validate(load_config(args.config, [*base, "train.fused_optimizer=true"]))
        variants = {
            "trainer": make_step(cfg, "train", args.batch),
            "warmup": make_step(cfg, "warmup", args.batch),
            "per-tensor EMA": make_step(cfg, "train", args.batch, state_type=PerTensorEma),
            "fused AdamW": make_step(fused, "train", args.batch),
            "sync per micro-batch": make_step(cfg, "train", args.batch, wrap=SyncEveryMicroBatch),
        }
        if not args.no_compile:
            variants["compiled"] = make_step(cfg, "train", args.batch, compiled=True)
        rows.append((arch, cfg, race(variants, args.rounds)))

    _, cfg, _ = rows[0]
    t = cfg.train
    print(
        f"train_step throughput, CPU, {torch.get_num_threads()} threads, batch {args.batch}, preset {Path(args.config).name}: "
        f"precision {t.precision}, grad_accum {t.grad_accum}, fused AdamW {t.use_fused_optimizer('cpu')}, "
        f"{args.rounds} rounds, median step time"
    )
    header = [
        "model",
        "eager samples/s",
        "compiled/eager",
        "warmup/full",
        "per-tensor EMA",
        "fused AdamW",
        "sync per micro-batch",
    ]
    print(" | ".join(header))
    for arch, _, s in rows:
        base = s["trainer"]
        compiled = f"{base / s['compiled']:.2f}x" if "compiled" in s else "skipped"
        print(
            " | ".join(
                [
                    arch,
                    f"{args.batch / base:.2f}",
                    compiled,
                    f"{s['warmup'] / base:.2f}",
                    f"{s['per-tensor EMA'] / base:.3f}",
                    f"{s['fused AdamW'] / base:.3f}",
                    f"{s['sync per micro-batch'] / base:.3f}",
                ]
            )
        )
    print("compiled/eager: speed-up; the other columns: step time relative to the trainer's step (> 1 is slower)")


if __name__ == "__main__":
    main()
