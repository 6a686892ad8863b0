"""Sampling throughput of SiT-S/2 on CPU: SDE vs ODE, with and without guidance, as ratios.

    python -m bench.sampling_throughput [--steps 4] [--batch-size 4] [--repeats 3] [--threads 0]

Runs the code path of `erw sample` (erw.evaluation.generate.generate_batch: per-sample noise
generators, float64 sampler state, the SiT forward in fp32) on a random-weight SiT-S/2 over
32x32x4 latents (256px images through a VAE; decoding is not timed). Each round runs every
configuration once, in a fresh random order, so drift in the machine's load does not favour a
position; medians over `--repeats` rounds are reported. Two clocks: wall time gives images/s,
and the process's CPU time gives the ratios, which other users of a shared machine barely move.

Expected: guidance doubles the batch of every forward inside its interval, so it costs
~1 / (1 + share of steps inside); Heun evaluates the model twice per step; the per-sample noise
generators (which make results independent of the number of ranks) cost next to nothing
against one generator per batch.

Absolute numbers depend on the machine and its load; the ratios are the result.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from erw.config import SampleConfig
from erw.evaluation.generate import SampleJob, generate_batch
from erw.models.sit import build_sit
from erw.sampling import model_velocity, sample

NUM_CLASSES = 1000
LATENT_SHAPE = (4, 32, 32)


def configurations(steps: int) -> dict[str, SampleConfig]:
    return {
        "sde": SampleConfig(mode="sde", steps=steps),
        "sde + cfg on [0, 1]": SampleConfig(mode="sde", steps=steps, cfg_scale=4.0),
        "sde + cfg on [0, 0.7]": SampleConfig(mode="sde", steps=steps, cfg_scale=1.8, guidance_high=0.7),
        "ode euler": SampleConfig(mode="ode", solver="euler", steps=steps),
        "ode heun": SampleConfig(mode="ode", solver="heun", steps=steps),
        "ode heun + cfg on [0, 1]": SampleConfig(mode="ode", solver="heun", steps=steps, cfg_scale=4.0),
    }


def time_once(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="sampler steps (250 in REPA's SDE; the ratios only depend on the share of steps guided)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_sit("SiT-S/2", input_size=32, in_channels=4, num_classes=NUM_CLASSES).eval()
    velocity = model_velocity(model)

    runs = {}
    for name, settings in configurations(args.steps).items():
        settings.batch_size = settings.num_samples = args.batch_size
        job = SampleJob(settings, tuple(range(NUM_CLASSES)), 0, "linear", LATENT_SHAPE, null_class=NUM_CLASSES)
        runs[name] = lambda job=job: generate_batch(job, velocity, 0, "cpu")

    def one_generator_per_batch() -> None:
        generator = torch.Generator().manual_seed(0)
        noise = lambda: torch.randn((args.batch_size, *LATENT_SHAPE), generator=generator, dtype=torch.float64)
        labels = torch.arange(args.batch_size)
        sample(velocity, noise, labels, mode="sde", steps=args.steps)

    runs["sde, one noise generator per batch"] = one_generator_per_batch

    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection, not timed
        model(
            torch.zeros(args.batch_size, *LATENT_SHAPE),
            torch.zeros(args.batch_size),
            torch.zeros(args.batch_size, dtype=torch.long),
        )
    order = random.Random(0)
    for round_ in range(args.repeats):
        names = list(runs)
        order.shuffle(names)
        for name in names:
            seconds, cpu_seconds = time_once(runs[name])
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            print(
                f"round {round_ + 1}/{args.repeats} {name}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU",
                file=sys.stderr,
                flush=True,
            )

    base = statistics.median(cpu["sde"])
    print(
        f"\nSiT-S/2 on CPU ({torch.get_num_threads()} threads), batch {args.batch_size}, {args.steps} steps, "
        f"median of {args.repeats}"
    )
    print(f"{'configuration':38s} {'images/s':>9s} {'speed vs sde (CPU time)':>24s}")
    for name in runs:
        rate = args.batch_size / statistics.median(wall[name])
        print(f"{name:38s} {rate:9.3f} {base / statistics.median(cpu[name]):23.2f}x")


if __name__ == "__main__":
    main()
