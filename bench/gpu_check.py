"""One-GPU training throughput of SiT-XL/2 in bf16: images/s and model FLOPs utilisation (MFU).

    bash bench/gpu_check.sh                       # the whole check, under 8 minutes on one H100/H200/A100
    .venv/bin/python bench/gpu_check.py --help

The model, encoder width, L2R depth and precision come from the preset (--config, default
configs/imagenet256-sit-xl2.yaml) plus key=value overrides. Four measurements, each a warm-up
(compilation included) then timed optimizer steps:

    full step    phase 2: the whole SiT + projector, denoising + alignment loss
    warmup step  phase 1: the first l2r_depth blocks + projector at t = 0, alignment loss only

each eager and under torch.compile. A step is the trainer's own step (erw.training.step.train_step)
with the preset's phase settings: bf16 autocast forward and backward through the project's
objectives, gradient clipping, the non-finite guard, AdamW (fused on CUDA: train.fused_optimizer)
and the EMA update. Alignment targets are random tokens of the configured encoder's shape: the frozen
encoder's forward is not part of the model's FLOPs and is left out. MFU = 3 x forward FLOPs per image
(erw.models.sit.flops_per_image) x images/s / the card's peak dense bf16 FLOPs (PEAK_TFLOPS).

Refuses to run without a CUDA GPU (exit 2). `--cpu` runs the same code on the CPU in fp32, for a
tiny model (e.g. model.depth=2 model.hidden_size=64): it checks the script, it measures nothing
worth reporting.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Peak dense bf16 tensor throughput (TFLOPS) by the model name in torch.cuda.get_device_name(),
# matched as a whole word ("L4" does not match "L40S"); the first match wins, so the specific
# variants come before their family.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


@dataclass
class Measurement:
    step: str  # "full" | "warmup"
    mode: str  # "eager" | "compiled"
    batch: int
    seconds_per_step: float | None  # None: skipped
    flops_per_image: float  # training FLOPs (3 x forward)
    peak_memory_gib: float | None = None
    note: str = ""

    @property
    def images_per_second(self) -> float | None:
        return None if self.seconds_per_step is None else self.batch / self.seconds_per_step

    def tflops(self) -> float | None:
        ips = self.images_per_second
        return None if ips is None else ips * self.flops_per_image / 1e12


def peak_tflops(device_name: str) -> float | None:
    for name, peak in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(name)}\b", device_name, re.IGNORECASE):
            return peak
    return None


def summary_table(rows: list[Measurement], device_name: str, peak: float | None) -> str:
    peak_text = f"{peak:g} TFLOPS bf16 dense" if peak else "unknown peak (pass --peak-tflops for MFU)"
    lines = [
        f"{device_name}, {peak_text}, torch {torch.__version__}",
        "",
        "| step | mode | batch | images/s | ms/step | model TFLOPS | MFU | peak memory (GiB) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.seconds_per_step is None:
            lines.append(f"| {r.step} | {r.mode} | {r.batch} | - | - | - | - | - | {r.note} |")
            continue
        mfu = f"{100 * r.tflops() / peak:.1f}%" if peak else "n/a"
        memory = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "n/a"
        lines.append(
            f"| {r.step} | {r.mode} | {r.batch} | {r.images_per_second:.1f} | {1000 * r.seconds_per_step:.1f} | "
            f"{r.tflops():.1f} | {mfu} | {memory} | {r.note} |"
        )
    by_key = {(r.step, r.mode): r for r in rows if r.seconds_per_step is not None}
    ratios = []
    for step in ("full", "warmup"):
        if (step, "eager") in by_key and (step, "compiled") in by_key:
            speedup = by_key[step, "eager"].seconds_per_step / by_key[step, "compiled"].seconds_per_step
            ratios.append(f"compiled/eager {step} step: {speedup:.2f}x")
    for mode in ("eager", "compiled"):
        if ("full", mode) in by_key and ("warmup", mode) in by_key:
            cost = by_key["warmup", mode].seconds_per_step / by_key["full", mode].seconds_per_step
            ratios.append(f"warmup/full step time ({mode}): {cost:.2f}")
    return "\n".join(lines + ([""] + ratios if ratios else []))


def build_step(cfg, phase: str, batch: int, compiled: bool, device: torch.device):
    """(one optimizer step exactly as the trainer takes it: erw.training.step.train_step with the
    preset's phase settings, training FLOPs per image)."""
    from erw.models.encoders import ENCODERS
    from erw.models.sit import flops_per_image
    from erw.training.distributed import Dist
    from erw.training.step import TrainState, train_step
    from erw.training.trainer import build_model, build_objective

    spec = ENCODERS[cfg.encoder.name]
    p = getattr(cfg, phase)
    model = build_model(cfg, phase, spec.dim).to(device)
    flops = 3.0 * flops_per_image(model)
    state = TrainState.create(model, p, device)
    objective = build_objective(cfg, phase, 0)
    net = torch.compile(model) if compiled else model
    size, channels, micro = cfg.data.latent_size, cfg.data.latent_channels, batch // p.grad_accum
    item = {  # cached encoder tokens: the frozen encoder's forward is not part of the model's FLOPs
        "latent": torch.randn(micro, channels, size, size, device=device),
        "label": torch.randint(0, cfg.model.num_classes, (micro,), device=device),
        "feat": torch.randn(micro, spec.num_tokens(cfg.data.resolution), spec.dim, device=device),
    }
    batches = iter(lambda: item, None)
    one_process = Dist(rank=0, local_rank=0, world_size=1, device=device)

    def step(i: int) -> None:
        train_step(
            state, batches, objective, p, seed=cfg.seed, dist_state=one_process, net=net, encoder=torch.nn.Identity()
        )

    return step, flops


def measure(cfg, args: argparse.Namespace, phase: str, mode: str, device: torch.device, deadline: float) -> Measurement:
    label = "warmup" if phase == "warmup" else "full"
    try:
        step, flops = build_step(cfg, phase, args.batch, mode == "compiled", device)
    except torch.OutOfMemoryError:
        return Measurement(label, mode, args.batch, None, math.nan, note="out of memory: lower --batch")
    if time.monotonic() > deadline:
        return Measurement(label, mode, args.batch, None, flops, note="skipped: time limit")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(args.warmup_steps):  # allocator, cuDNN/cuBLAS heuristics and compilation
            step(i)
        sync()
        started = time.perf_counter()
        for i in range(args.steps):
            step(args.warmup_steps + i)
        sync()
    except torch.OutOfMemoryError:
        return Measurement(label, mode, args.batch, None, flops, note="out of memory: lower --batch")
    seconds = (time.perf_counter() - started) / args.steps
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Measurement(label, mode, args.batch, seconds, flops, memory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "imagenet256-sit-xl2.yaml"), help="preset")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.depth=2")
    parser.add_argument("--batch", type=int, default=32, help="images per step (the paper's 256 over 8 GPUs = 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOPS, when not in the table")
    parser.add_argument("--time-limit", type=float, default=420, help="seconds; later measurements are skipped")
    parser.add_argument("--results", help="also write the table into this markdown file (section gpu-check)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (checks the script with a tiny model)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"eager", "compiled"}:
        parser.error(f"--modes={args.modes!r}: choose from eager, compiled")
    from erw.config import load_config, validate
    from erw.errors import ErwError

    try:
        cpu_precision = ["train.precision=fp32", "warmup.precision=fp32"] if args.cpu else []
        cfg = validate(load_config(args.config, [*cpu_precision, *args.overrides]))
    except ErwError as err:
        parser.error(str(err))

    if args.cpu:
        device, name = torch.device("cpu"), "CPU (script check only)"
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False). This check measures "
            "SiT-XL/2 bf16 training throughput on one GPU; run it on a GPU node. (--cpu runs the script on a "
            "tiny model to check it, measuring nothing.)",
            file=sys.stderr,
        )
        return 2
    else:
        device, name = torch.device("cuda", 0), torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = args.peak_tflops or (None if args.cpu else peak_tflops(name))
    deadline = time.monotonic() + args.time_limit
    rows = []
    for phase in ("train", "warmup"):
        for mode in modes:
            rows.append(measure(cfg, args, phase, mode, device, deadline))
            print(f"measured {rows[-1].step} step, {mode}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = summary_table(rows, name, peak)
    print(table)
    if args.results:
        from bench.results_md import write_section

        title = f"## One-GPU training throughput ({cfg.model.arch}, batch {args.batch}, `bash bench/gpu_check.sh`)"
        write_section(args.results, "gpu-check", f"{title}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
