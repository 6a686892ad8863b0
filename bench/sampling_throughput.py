"""Sampling throughput of SiT-S/2 on CPU: SDE vs ODE, with and without guidance, as ratios.

    python bench/sampling_throughput.py [--steps 10] [--batch-size 4] [--repeats 3] [--threads 0]

Runs the code path of `erw sample` (erw.evaluation.generate.generate_batch: per-sample noise
generators, float64 sampler state, the SiT forward in fp32) on a random-weight SiT-S/2 over
32x32x4 latents (256px images through a VAE; decoding is not timed). Configurations run in
turn, `--repeats` rounds, so drift in the machine's load hits all of them alike; the median
of each is reported as images/s and as a ratio to the plain SDE. Guidance doubles the batch
of every forward inside its interval, so its cost is ~1 / (1 + fraction of steps inside);
Heun evaluates the model twice per step. A last row prices the per-sample noise generators
(needed for results independent of the number of ranks) against one generator per batch.

Absolute numbers depend on the machine and its load; the ratios are the result.
"""
from __future__ import annotations

import argparse
import statistics
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


def time_once(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (250 in REPA's SDE; ratios do not depend on it)")
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
        noise = lambda: torch.randn((args.batch_size, *LATENT_SHAPE), generator=generator, dtype=torch.float64)  # noqa: E731
        labels = torch.arange(args.batch_size)
        sample(velocity, noise, labels, mode="sde", steps=args.steps)

    runs["sde, one noise generator per batch"] = one_generator_per_batch

    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up round, not timed
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(time_once(run))

    base = args.batch_size / statistics.median(times["sde"])
    print(f"SiT-S/2 on CPU ({torch.get_num_threads()} threads), batch {args.batch_size}, {args.steps} steps, "
          f"median of {args.repeats}")
    print(f"{'configuration':38s} {'images/s':>9s} {'vs sde':>7s}")
    for name, measured in times.items():
        rate = args.batch_size / statistics.median(measured)
        print(f"{name:38s} {rate:9.3f} {rate / base:7.2f}x")


if __name__ == "__main__":
    main()
