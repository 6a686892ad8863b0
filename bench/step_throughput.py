"""Training throughput on this machine, as ratios measured side by side in one run.

    python bench/step_throughput.py [--batch 8] [--steps 5] [--no-compile]

For SiT-S/2 and SiT-B/2 on 32x32x4 latents (256px images): samples/s of a full phase-2 step
(forward + backward + AdamW), eager vs torch.compile, and the cost of an ERW warmup step
(the first l2r_depth blocks at t = 0) relative to a full step. Absolute numbers drift with the
machine's load; the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import time

import torch

from erw.config import ModelConfig, ObjectiveConfig
from erw.models.sit import l2r_from_config, sit_from_config
from erw.objectives import DiffusionObjective, WarmupObjective

ENCODER_DIM, TOKENS = 768, 256


def make_step(model, objective, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))
    targets = torch.randn(batch, TOKENS, ENCODER_DIM)

    def step(i: int) -> None:
        loss, _ = objective(model, x, y, targets, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def samples_per_second(step, batch: int, steps: int) -> float:
    step(0)  # warm-up (and compilation)
    step(1)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for arch, align_depth in (("SiT-S/2", 8), ("SiT-B/2", 8)):
        cfg = ModelConfig(arch=arch, align_depth=align_depth, l2r_depth=4)
        full = sit_from_config(cfg, 32, 4, ENCODER_DIM)
        warm = l2r_from_config(cfg, 32, 4, ENCODER_DIM)
        diffusion = DiffusionObjective(ObjectiveConfig(), cfg, 0)
        eager = samples_per_second(make_step(full, diffusion, args.batch), args.batch, args.steps)
        warmup = samples_per_second(make_step(warm, WarmupObjective(), args.batch), args.batch, args.steps)
        compiled = None
        if not args.no_compile:
            compiled_model = torch.compile(sit_from_config(cfg, 32, 4, ENCODER_DIM))
            compiled = samples_per_second(make_step(compiled_model, diffusion, args.batch), args.batch, args.steps)
        rows.append((arch, eager, compiled, warmup))

    print(f"training step throughput, CPU, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'model':<9} {'eager samples/s':>16} {'compiled/eager':>15} {'warmup/full step time':>22}")
    for arch, eager, compiled, warmup in rows:
        ratio = f"{compiled / eager:.2f}x" if compiled else "skipped"
        print(f"{arch:<9} {eager:>16.2f} {ratio:>15} {eager / warmup:>21.2f}x")


if __name__ == "__main__":
    main()
