"""Cost of the Prometheus exporter on training step time, measured side by side in one run.

    python -m bench.metrics_overhead [--steps 600] [--switch-every 1] [--scrape-every 1.0]

One run of the real training loop (erw.training.trainer.run) on a small SiT on CPU (the demo
preset shrunk to depth 4, width 64: a short step makes any per-step cost show). The exporter is
switched on and off every --switch-every steps: on, every metrics call reaches a live
TrainingMetrics and a thread scrapes its /metrics every --scrape-every seconds (Prometheus in
the cluster scrapes every 15 s, so the default is a harsh upper bound); off, the calls do
nothing and nobody scrapes. Step time is the wall time between two batch fetches, so it holds
every call the loop makes. Interleaving step by step in one run cancels drift in the machine's
load, which on a shared machine is far larger than the effect measured; the ratio of medians is
the result. On a crowded machine, OMP_NUM_THREADS=1 keeps torch's thread pool from dominating.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from erw.config import load_config
from erw.telemetry import TrainingMetrics
from erw.training.distributed import Dist
from erw.training.trainer import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WARMUP_STEPS = 5  # the first steps pay for allocator and thread-pool warm-up


class Switch:
    """Whether the exporter is on for the current step."""

    on = False


class SwitchedMetrics:
    """Forwards every metrics call to `metrics` while the switch is on, drops it while off."""

    def __init__(self, metrics: TrainingMetrics, switch: Switch):
        self.metrics, self.switch = metrics, switch

    def __getattr__(self, name: str):
        return getattr(self.metrics, name) if self.switch.on else _ignore


def _ignore(*args, **kwargs) -> None:
    return None


class SwitchingBatches:
    """Fixed random batches; records each fetch time and flips the switch every `every` steps."""

    def __init__(self, batch_size: int, channels: int, size: int, switch: Switch, every: int):
        self.latent = torch.randn(batch_size, channels, size, size)
        self.label = torch.randint(0, 10, (batch_size,))
        self.switch, self.every = switch, every
        self.fetched: list[tuple[float, bool]] = []

    def __iter__(self):
        while True:
            self.switch.on = (len(self.fetched) // self.every) % 2 == 1
            self.fetched.append((time.perf_counter(), self.switch.on))
            yield {"latent": self.latent, "label": self.label}

    def step_seconds(self, exporter_on: bool) -> list[float]:
        """Durations of the steps that ran with the exporter on (or off), warm-up excluded."""
        pairs = zip(self.fetched[WARMUP_STEPS:], self.fetched[WARMUP_STEPS + 1 :])
        return [end - start for (start, on), (end, _) in pairs if on == exporter_on]


class Scraper(threading.Thread):
    """Scrapes a /metrics endpoint every `every` seconds while the switch is on."""

    def __init__(self, url: str, every: float, switch: Switch):
        super().__init__(daemon=True)
        self.url, self.every, self.switch, self.count = url, every, switch, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            if self.switch.on:
                urllib.request.urlopen(self.url, timeout=5).read()
                self.count += 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def observe_step_microseconds(calls: int = 20_000) -> float:
    metrics = TrainingMetrics(free_port(), "bench", "train", rank=0, local_rank=0, addr="127.0.0.1")
    try:
        started = time.perf_counter()
        for step in range(calls):
            metrics.observe_step(
                step=step,
                samples=8,
                losses={"loss": 0.5, "loss_denoise": 0.4, "loss_align": -0.1},
                align_weight=1.0,
                lr=1e-4,
                grad_norm=1.0,
                step_seconds=0.05,
                data_wait_seconds=0.001,
            )
        return 1e6 * (time.perf_counter() - started) / calls
    finally:
        metrics.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--switch-every", type=int, default=1, help="steps between exporter on/off switches")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes while on")
    args = parser.parse_args()

    switch = Switch()
    port = free_port()
    metrics = TrainingMetrics(port, "bench", "train", rank=0, local_rank=0, addr="127.0.0.1")
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics", args.scrape_every, switch)
    scraper.start()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            CONFIGS / "demo.yaml",
            [
                "encoder.name=none",
                "model.depth=4",
                "model.hidden_size=64",
                "model.num_heads=2",
                "model.l2r_depth=2",
                "model.align_depth=2",
                f"train.steps={args.steps}",
                f"train.batch_size={args.batch}",
                f"train.ckpt_every={args.steps}",
                f"train.log_every={args.steps}",
                f"train.out={out}",
            ],
        )
        batches = SwitchingBatches(
            cfg.train.batch_size, cfg.data.latent_channels, cfg.data.latent_size, switch, args.switch_every
        )
        cpu = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        try:
            run(cfg, "train", batches, cpu, metrics=SwitchedMetrics(metrics, switch), log=lambda _msg: None)
        finally:
            scraper.stopped.set()
            scraper.join()
            metrics.close()

    off, on = batches.step_seconds(False), batches.step_seconds(True)
    print(
        f"small SiT (demo preset, depth 4, width 64, no encoder), batch {args.batch}, CPU, {args.steps} steps, "
        f"exporter switched every {args.switch_every} steps, {scraper.count} scrapes while on"
    )
    print(
        f"median step time: exporter off {1e3 * statistics.median(off):.2f} ms, on {1e3 * statistics.median(on):.2f} ms"
    )
    print(
        f"step time ratio on/off: median {statistics.median(on) / statistics.median(off):.4f}, "
        f"mean {statistics.fmean(on) / statistics.fmean(off):.4f}"
    )
    print(f"one observe_step call: {observe_step_microseconds():.1f} us")


if __name__ == "__main__":
    main()
