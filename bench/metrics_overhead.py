"""Cost of the Prometheus exporter on training step time, measured side by side in one run.

    python bench/metrics_overhead.py [--rounds 10] [--steps 20] [--scrape-every 1.0]

Runs the real training loop (erw.training.trainer.run) on a small SiT on CPU (the demo preset
shrunk to depth 4, width 64: a short step makes any per-step cost show) in alternating
blocks: exporter off (metrics=None), exporter on (TrainingMetrics serving /metrics while a
thread scrapes it every --scrape-every seconds; Prometheus in the cluster scrapes every 15 s, so
the default is a harsh upper bound). Step time is the wall time between two batch fetches, so
it includes every metrics call the loop makes. The order of the two blocks alternates per round
to cancel drift in the machine's load; the ratio of the medians is the result.
"""
from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from erw.config import load_config
from erw.metrics import TrainingMetrics
from erw.training.distributed import Dist
from erw.training.trainer import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WARMUP_STEPS = 3  # first steps of each block pay for allocator and thread-pool warm-up


class TimedBatches:
    """Fixed random batches; records when each one is fetched."""

    def __init__(self, batch_size: int, channels: int, size: int):
        self.latent = torch.randn(batch_size, channels, size, size)
        self.label = torch.randint(0, 10, (batch_size,))
        self.fetched: list[float] = []

    def __iter__(self):
        while True:
            self.fetched.append(time.perf_counter())
            yield {"latent": self.latent, "label": self.label}

    def step_seconds(self) -> list[float]:
        times = self.fetched[WARMUP_STEPS:]
        return [b - a for a, b in zip(times, times[1:])]


class Scraper(threading.Thread):
    """Scrapes a /metrics endpoint every `every` seconds until stopped; counts the scrapes."""

    def __init__(self, url: str, every: float):
        super().__init__(daemon=True)
        self.url, self.every, self.count = url, every, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            urllib.request.urlopen(self.url, timeout=5).read()
            self.count += 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def block(cfg, exporter_on: bool, scrape_every: float) -> tuple[list[float], int]:
    """One training run of cfg.train.steps steps; returns its step times and the scrape count."""
    batches = TimedBatches(cfg.train.batch_size, cfg.data.latent_channels, cfg.data.latent_size)
    cpu = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    metrics, scraper = None, None
    if exporter_on:
        port = free_port()
        metrics = TrainingMetrics(port, "bench", "train", rank=0, local_rank=0, addr="127.0.0.1")
        scraper = Scraper(f"http://127.0.0.1:{port}/metrics", scrape_every)
        scraper.start()
    try:
        run(cfg, "train", batches, cpu, metrics=metrics, log=lambda _msg: None)
    finally:
        if scraper is not None:
            scraper.stopped.set()
            scraper.join()
        if metrics is not None:
            metrics.close()
    return batches.step_seconds(), scraper.count if scraper else 0


def observe_step_microseconds(calls: int = 20_000) -> float:
    metrics = TrainingMetrics(free_port(), "bench", "train", rank=0, local_rank=0, addr="127.0.0.1")
    try:
        started = time.perf_counter()
        for step in range(calls):
            metrics.observe_step(
                step=step, samples=32, losses={"loss": 0.5, "loss_denoise": 0.4, "loss_align": -0.1},
                align_weight=1.0, lr=1e-4, grad_norm=1.0, step_seconds=0.05, data_wait_seconds=0.001,
            )
        return 1e6 * (time.perf_counter() - started) / calls
    finally:
        metrics.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="pairs of (off, on) blocks")
    parser.add_argument("--steps", type=int, default=20, help="training steps per block")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes while on")
    args = parser.parse_args()

    times: dict[bool, list[float]] = {False: [], True: []}
    scrapes = 0
    with tempfile.TemporaryDirectory() as out:
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for exporter_on in order:
                cfg = load_config(
                    CONFIGS / "demo.yaml",
                    [
                        "encoder.name=none", "model.depth=4", "model.hidden_size=64", "model.num_heads=2",
                        "model.l2r_depth=2", "model.align_depth=2", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                        f"train.ckpt_every={args.steps}", f"train.log_every={args.steps}", "train.keep_last=0",
                        f"train.out={out}/{round_index}-{int(exporter_on)}",
                    ],
                )
                step_times, count = block(cfg, exporter_on, args.scrape_every)
                times[exporter_on] += step_times
                scrapes += count

    off, on = statistics.median(times[False]), statistics.median(times[True])
    mean_off, mean_on = statistics.fmean(times[False]), statistics.fmean(times[True])
    print(f"small SiT (demo preset, depth 4, width 64, no encoder), batch {args.batch}, CPU, "
          f"{args.rounds} rounds x {args.steps} steps per mode, {scrapes} scrapes while on")
    print(f"median step time: exporter off {1e3 * off:.2f} ms, on {1e3 * on:.2f} ms")
    print(f"step time ratio on/off: median {on / off:.4f}, mean {mean_on / mean_off:.4f}")
    print(f"one observe_step call: {observe_step_microseconds():.1f} us")


if __name__ == "__main__":
    main()
