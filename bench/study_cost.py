"""What a convergence study with other model or budget flags costs, against the digits study's
default model, measured side by side in one run (no study is trained).

    nice -n 5 .venv/bin/python -m bench.study_cost --depth 12 --warmup 400
    nice -n 5 .venv/bin/python -m bench.study_cost --depth 12 --warmup 400 --budget-scale 2 --seeds 1

For the size's own model (default: the 6-block digits SiT) and the one the flags give, times the
trainer's step (erw.training.step.train_step with the study's config: batch, fp32, EMA) of plain
SiT, of an aligned phase-2 step (REPA, ERW) and of an ERW warmup step, on random pixels and
encoder tokens of the study's shapes, and one evaluation's sampling (the study's class-balanced
Heun samples, random weights: the cost does not depend on them). The variants take turns, one
step at a time, and each one's median is kept, so the load of a shared machine hits them alike.

From those times, each study's compute (its runs' steps and evaluations, one process of
--threads threads, as the study's workers run) and the ratio of the two; the evaluator's scoring,
the small networks' training (cached) and the analyses at the end are not counted. Scale a
measured wall time of the default study by the ratio to predict the other's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Callable

import torch

from bench.smallscale import (
    SIZES,
    Size,
    add_process_arguments,
    add_size_arguments,
    encoder_kwargs,
    generate,
    main_methods,
    model_flags,
    size_name,
    study_config,
    study_size,
    warmup_step_cost,
)
from bench.step_throughput import race
from erw.training.step import TrainState, train_step
from erw.training.trainer import build_model, build_objective


def step_of(size: Size, phase: str, aligned: bool) -> Callable[[], None]:
    """One call = one optimizer step of the study's trainer for `phase` (plain SiT when not aligned)."""
    method = main_methods(size)[2 if aligned else 0]
    cfg = study_config(size, method, 0, Path("."), "")
    dim = encoder_kwargs(size)["embed_dim"] if aligned else None
    p = getattr(cfg, phase)
    torch.manual_seed(0)
    model = build_model(cfg, phase, dim)
    state = TrainState.create(model, p, torch.device("cpu"))
    objective = build_objective(cfg, phase, 0)
    batch = {
        "latent": torch.rand(p.batch_size, 3, size.resolution, size.resolution) * 2 - 1,
        "label": torch.randint(0, size.num_classes, (p.batch_size,)),
    }
    if aligned:
        batch["feat"] = torch.randn(p.batch_size, (size.resolution // size.patch) ** 2, dim)
    batches = itertools.repeat(batch)
    encoder = torch.nn.Identity() if aligned else None
    return lambda: train_step(state, batches, objective, p, seed=cfg.seed, net=model, encoder=encoder)


def evaluation_of(size: Size) -> Callable[[], None]:
    """One call = the sampling of one evaluation point of the study (the phase-2 model)."""
    cfg = study_config(size, main_methods(size)[0], 0, Path("."), "")
    model = build_model(cfg, "train", None).eval()
    return lambda: generate(model, size)


def run_seconds(size: Size, t: dict[str, float]) -> list[float]:
    """Compute seconds of each of a study's runs, in the study's order (seed by seed, the methods
    in turn): its steps and its evaluations."""
    full = size.budget - size.warmup
    evaluations = size.budget // size.eval_every
    per_method = [
        size.budget * t["plain"] + evaluations * t["evaluation"],
        size.budget * t["aligned"] + evaluations * t["evaluation"],
        size.warmup * t["warmup"] + full * t["aligned"] + full // size.eval_every * t["evaluation"],
    ]
    return per_method * len(size.seeds)


def wall_seconds(runs: list[float], jobs: int) -> float:
    """When the last run ends, each run taken in order by the first of `jobs` processes to be free
    (as the study's process pool does)."""
    free = [0.0] * max(1, jobs)
    for seconds in runs:
        free[free.index(min(free))] += seconds
    return max(free)


def measure(size: Size, rounds: int, evaluation_rounds: int, other: Size) -> dict[str, dict[str, float]]:
    """Median seconds of each variant of both sizes, taking turns."""
    steps = {}
    for name, s in (("base", size), ("other", other)):
        steps[f"{name} plain"] = step_of(s, "train", aligned=False)
        steps[f"{name} aligned"] = step_of(s, "train", aligned=True)
        steps[f"{name} warmup"] = step_of(s, "warmup", aligned=True)
    times = race(steps, rounds)
    evaluations = race({"base": evaluation_of(size), "other": evaluation_of(other)}, evaluation_rounds, warmup_calls=0)
    return {
        name: {kind: times[f"{name} {kind}"] for kind in ("plain", "aligned", "warmup")}
        | {"evaluation": evaluations[name]}
        for name in ("base", "other")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(parser, tiny="the --tiny study's sizes (checks the path)", full="the --full study's sizes")
    add_process_arguments(parser)
    parser.add_argument("--seeds", type=int, help="the study's seeds 0..N-1 (default: the size's)")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--evaluation-rounds", type=int, default=2, help="timed evaluations per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    other = study_size(args, args.seeds)
    base = dataclasses.replace(
        SIZES[size_name(args)], images=other.images, resolution=other.resolution, patch=other.patch
    )
    for size in (base, other):
        if size.problems():
            parser.error("; ".join(size.problems()))
    t = measure(base, args.rounds, args.evaluation_rounds, other)

    flags = model_flags(other, base) or " (none)"
    print(
        f"{size_name(args)} size vs the flags{flags}; CPU, {args.threads} thread(s), batch {base.batch}, "
        f"median of {args.rounds} steps and {args.evaluation_rounds} evaluations"
    )
    print(
        f"model                       plain step  aligned step  warmup step (time, FLOPs)  evaluation  "
        f"runs  compute  wall with --jobs {args.jobs}"
    )
    wall = {}
    for name, size in (("base", base), ("other", other)):
        s = t[name]
        runs = run_seconds(size, s)
        wall[name] = wall_seconds(runs, args.jobs)
        model = f"{size.depth} blocks, L2R {size.l2r_depth}"
        print(
            f"{model:<26} {1e3 * s['plain']:8.1f} ms  {1e3 * s['aligned']:9.1f} ms  "
            f"{1e3 * s['warmup']:7.1f} ms ({s['warmup'] / s['aligned']:.2f}x, {warmup_step_cost(size):.2f}x)  "
            f"{s['evaluation']:8.2f} s  {len(runs):4d}  {sum(runs) / 60:5.1f} min  {wall[name] / 60:5.1f} min"
        )
    ratios = {kind: t["other"][kind] / t["base"][kind] for kind in ("plain", "aligned", "warmup", "evaluation")}
    print("step and evaluation time, flags/base: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(
        f"study wall time with --jobs {args.jobs}, flags/base: {wall['other'] / wall['base']:.2f}x "
        f"(the flags: {len(other.seeds)} seed(s) x 3 methods, {other.budget} steps, an evaluation every "
        f"{other.eval_every}); multiply a measured wall time of the base study by it"
    )


if __name__ == "__main__":
    main()
