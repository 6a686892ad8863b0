"""Plain SiT vs SiT + REPA vs SiT + REPA + ERW at small scale: how fast each reaches a sample quality.

    nice -n 5 .venv/bin/python bench/convergence.py          # default size: about 20 minutes on 2 CPU cores
    .venv/bin/python bench/convergence.py --full             # 4x the steps, 2x the batch, 5 seeds, 5x the samples
    .venv/bin/python bench/convergence.py --tiny --out DIR --results FILE   # seconds (the test)

The three methods share the model (a 6-block SiT with 4x4-pixel patches on the 32x32 digits,
identity codec), the data order, the batch, the optimiser and the budget of optimizer steps. ERW
spends the first `warmup` steps of its budget on the warmup (the first l2r_depth blocks align to
the encoder on clean images), then trains the full model initialised from it with the decaying
alignment weight; REPA aligns with a constant weight from scratch. Training is done by the
project's trainer (erw.training.trainer.run), evaluation on the EMA weights every `eval_every`
steps: Fréchet distance (FD) in the features of a separately trained evaluator network between
generated digits and all real digits, and the evaluator's class accuracy on generated digits.

Reported per method, as mean +- standard deviation over seeds: steps and FLOPs to reach a target
FD (default: plain SiT's mean FD at the end of the budget), FD and accuracy at the end. FLOPs are
3x the model's forward FLOPs per trained image (erw.models.sit.flops_per_image, the warmup model
for warmup steps) plus the encoder's forward for alignment targets. Writes DIR/convergence.json,
the curves next to FILE (convergence.png) and the "convergence" section of FILE.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_md import machine, write_section  # noqa: E402
from smallscale import (  # noqa: E402
    RESOLUTION, Curve, Digits, Evaluator, Size, block_features, encoder_kwargs, ensure_small_nets, main_methods,
    mean_std, probe_accuracy, steps_to_target, train_and_evaluate,
)

from erw.models.encoders import load_encoder  # noqa: E402
from erw.training import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": Size(budget=4, eval_every=2, warmup=2, batch=8, seeds=(0, 1, 2), num_samples=20, sample_steps=2,
                 depth=3, hidden=32, heads=2, projector_dim=32, align_depth=2, l2r_depth=1,
                 encoder_steps=5, evaluator_steps=5),
    # Batch 8: at this scale progress is counted in optimizer steps (the class embedding and the
    # attention take thousands of steps to matter), so many small steps beat fewer large ones.
    "default": Size(budget=3200, eval_every=400, warmup=800, batch=8, seeds=(0, 1, 2), num_samples=200, sample_steps=8),
    "full": Size(budget=12800, eval_every=800, warmup=3200, batch=16, seeds=(0, 1, 2, 3, 4), num_samples=1000,
                 sample_steps=16, encoder_steps=1500, evaluator_steps=1500),
}
PROBE_TIMES = (0.0, 0.5)


def size_name(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "full" if args.full else "default"


def reproduce_command(args: argparse.Namespace) -> str:
    flag = {"tiny": " --tiny", "full": " --full", "default": ""}[size_name(args)]
    target = f" --target {args.target}" if args.target is not None else ""
    return f"nice -n 5 .venv/bin/python bench/convergence.py{flag}{target}"


# ---------------------------------------------------------------------------------------------
# Summaries.


def summarize(curves: list[Curve], target: float) -> list[dict]:
    rows = []
    for method in dict.fromkeys(c.method for c in curves):
        mine = [c for c in curves if c.method == method]
        steps = [steps_to_target(c.points, target, "step") for c in mine]
        flops = [steps_to_target(c.points, target, "flops") for c in mine]
        reached = [s for s in steps if s is not None]
        rows.append({
            "method": method, "seeds": len(mine), "reached": len(reached),
            "steps": mean_std(reached) if reached else None,
            "flops": mean_std([f for f in flops if f is not None]) if reached else None,
            "final_fd": mean_std([c.points[-1]["fd"] for c in mine]),
            "final_accuracy": mean_std([c.points[-1]["accuracy"] for c in mine]),
            "budget_flops": mine[0].points[-1]["flops"],
            "seconds": mean_std([c.seconds for c in mine]),
        })
    return rows


def pm(value: tuple[float, float] | None, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    if value is None:
        return "not reached"
    mean, std = value
    return f"{fmt.format(mean * scale)} ± {fmt.format(std * scale)}"


def table(rows: list[dict], target: float) -> str:
    lines = [
        f"| method | steps to FD ≤ {target:.2f} | GFLOPs to FD ≤ {target:.2f} | seeds reaching it | FD at end | "
        "accuracy at end | GFLOPs of the budget | training time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {pm(r['steps'])} | {pm(r['flops'], '{:.1f}', 1e-9)} | {r['reached']}/{r['seeds']} | "
            f"{pm(r['final_fd'], '{:.2f}')} | {pm(r['final_accuracy'], '{:.1f}%', 100)} | "
            f"{r['budget_flops'] / 1e9:.1f} | {pm(r['seconds'])} |"
        )
    return "\n".join(lines)


def speedups(rows: list[dict]) -> list[str]:
    """Plain sentences comparing each method with the one before it, from the numbers alone."""
    by_name = {r["method"]: r for r in rows}
    out = []
    for a, b in (("SiT+REPA+ERW", "SiT+REPA"), ("SiT+REPA", "SiT"), ("SiT+REPA+ERW", "SiT")):
        if a not in by_name or b not in by_name:
            continue
        ra, rb = by_name[a], by_name[b]
        if ra["steps"] is None:
            out.append(f"- {a} did not reach the target in the budget on any seed; {b} did on {rb['reached']}/{rb['seeds']}.")
            continue
        if rb["steps"] is None:
            out.append(f"- {a} reached the target ({ra['reached']}/{ra['seeds']} seeds), {b} did not on any seed.")
            continue
        out.append(
            f"- {a} vs {b}: {rb['steps'][0] / ra['steps'][0]:.2f}x fewer steps and {rb['flops'][0] / ra['flops'][0]:.2f}x "
            f"fewer FLOPs to the target (means over the seeds that reached it: {ra['reached']} and {rb['reached']}); "
            f"FD at the end {ra['final_fd'][0]:.2f} vs {rb['final_fd'][0]:.2f}."
        )
    return out


def plot(curves: list[Curve], target: float, floor: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in dict.fromkeys(c.method for c in curves):
        mine = [c for c in curves if c.method == method]
        steps = np.array([p["step"] for p in mine[0].points])
        gflops = np.array([p["flops"] for p in mine[0].points]) / 1e9
        for ax, x, key, scale in ((axes[0], steps, "fd", 1), (axes[1], gflops, "fd", 1), (axes[2], steps, "accuracy", 100)):
            values = np.array([[p[key] * scale for p in c.points] for c in mine])
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=method)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for ax in axes[:2]:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}")
        ax.axhline(floor, color="black", linestyle=":", linewidth=1, label=f"real-data floor {floor:.2f}")
        ax.set_yscale("log")
        ax.set_ylabel("Fréchet distance (evaluator features)")
    axes[0].set_xlabel("optimizer steps (ERW: warmup included)")
    axes[1].set_xlabel("training GFLOPs")
    axes[2].set_xlabel("optimizer steps (ERW: warmup included)")
    axes[2].set_ylabel("class accuracy of samples (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"digits 32x32, mean ± std over {len({c.seed for c in curves})} seeds")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Where the representation lives.


def layer_probes(curves: list[Curve], digits: Digits, encoder_file: str) -> dict[str, dict[float, list[float]]]:
    """Linear-probe accuracy per block of the first seed's final model of each method."""
    seed = curves[0].seed
    out: dict[str, dict[float, list[float]]] = {}
    for curve in (c for c in curves if c.seed == seed):
        saved = ckpt.load_checkpoint(curve.final_checkpoint, with_train_state=False)
        cfg = saved.config()
        encoder_dim = load_encoder(cfg.encoder, RESOLUTION).dim if cfg.encoder.name != "none" else None
        out[curve.method] = {
            t: [probe_accuracy(f, digits.labels) for f in block_features(cfg, saved.ema_state, encoder_dim, digits, t)]
            for t in PROBE_TIMES
        }
    return out


def reference_probes(digits: Digits, encoder_file: str) -> dict[str, float]:
    """The same probe on raw pixels and on the encoder's mean token: what the numbers mean."""
    from erw.config import EncoderConfig

    encoder = load_encoder(EncoderConfig("timm-file", weights=encoder_file), RESOLUTION)
    with torch.no_grad():
        tokens = torch.cat([encoder(digits.images[i:i + 500]).mean(dim=1) for i in range(0, len(digits.images), 500)])
    return {
        "pixels": probe_accuracy(digits.images.flatten(1).float().numpy(), digits.labels),
        "encoder": probe_accuracy(tokens.numpy(), digits.labels),
    }


def probe_table(probes: dict[str, dict[float, list[float]]], references: dict[str, float]) -> str:
    methods = list(probes)
    header = "| block | " + " | ".join(f"{m} t={t:g}" for m in methods for t in PROBE_TIMES) + " |"
    lines = [header, "|---" * (1 + len(methods) * len(PROBE_TIMES)) + "|"]
    depth = len(next(iter(probes.values()))[PROBE_TIMES[0]])
    for block in range(depth):
        cells = [f"{100 * probes[m][t][block]:.1f}%" for m in methods for t in PROBE_TIMES]
        lines.append(f"| {block + 1} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nReferences (same probe, same split): raw pixels {100 * references['pixels']:.1f}%, "
        f"the encoder's mean token {100 * references['encoder']:.1f}%."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def markdown(args, size: Size, nets, evaluator: Evaluator, rows, target: float, target_source: str, probes_md: str,
             png_name: str, seconds: float) -> str:
    enc, ev = nets.reports["encoder"], nets.reports["evaluator"]
    kw = encoder_kwargs()
    methods = main_methods(size)
    return "\n".join([
        f"## Convergence: plain SiT vs SiT+REPA vs SiT+REPA+ERW ({size_name(args)} size)",
        "",
        f"Reproduce: `{reproduce_command(args)}` — this run: {seconds / 60:.0f} min on {machine()}.",
        "",
        "Setup (identical for the three methods unless said): the 1,797 digits at 32x32 (identity codec: the model "
        f"denoises pixels), SiT with {size.depth} blocks, width {size.hidden}, {size.heads} heads, {size.patch}x{size.patch}-pixel "
        f"patches ({(32 // size.patch) ** 2} tokens), batch {size.batch}, AdamW lr {size.lr:g}, EMA {size.ema_decay}, fp32, budget {size.budget} "
        f"optimizer steps, seeds {', '.join(map(str, size.seeds))}. REPA: projector after block {size.align_depth}, "
        f"constant weight c0 = 1 from step 0. ERW: {size.warmup} warmup steps of the budget train blocks 1-{size.l2r_depth} "
        f"to match the encoder on clean images, then {size.budget - size.warmup} steps of the full model initialised from "
        f"them, weight c0 * 2^(-(s - W) / {dict(o.split('=') for o in methods[2].overrides)['objective.align_half_life']}). "
        f"Encoder: a {kw['depth']}-block ViT (width {kw['embed_dim']}, {kw['patch_size']}x{kw['patch_size']}-pixel "
        f"patches) trained supervised on the digit labels (a linear classifier on its mean patch token), "
        f"{100 * enc['val_accuracy']:.1f}% held-out accuracy. Evaluator: a CNN (other architecture, seed and split), "
        f"{100 * ev['val_accuracy']:.1f}% held-out accuracy; FD between {size.num_samples} class-balanced samples "
        f"(Heun ODE, {size.sample_steps} steps, no guidance, the same noise for every model) and all real digits in its "
        f"{evaluator.dim}-d penultimate features. {size.num_samples} real digits score FD {evaluator.floor:.2f} (the floor); real "
        f"digits' accuracy is the evaluator's {100 * ev['val_accuracy']:.1f}%.",
        "",
        f"Target: FD ≤ {target:.2f} ({target_source}). Steps and FLOPs are those of the first evaluation "
        f"(every {size.eval_every} steps) at or below the target, mean ± std over the seeds that reached it.",
        "",
        table(rows, target),
        "",
        *speedups(rows),
        "",
        f"![convergence curves]({png_name})",
        "",
        "### Where the representation lives: linear probe per block",
        "",
        "Held-out accuracy (30% of the digits) of a linear probe (ridge classifier on standardised features) on each block's mean token of the first "
        "seed's final EMA model, on digits noised to time t, given the null class label (the class label would hand "
        "the probe the answer).",
        "",
        probes_md,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tiny", action="store_true", help="a few steps of a tiny model: checks the whole path")
    group.add_argument("--full", action="store_true", help="4x the steps at twice the batch, 5 seeds, 1000 samples")
    parser.add_argument("--out", default="runs/bench/convergence", help="run directory (checkpoints, logs, json)")
    parser.add_argument("--cache", default="runs/bench/cache", help="where the small encoder and evaluator are kept")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results.md"), help="markdown file to update")
    parser.add_argument("--target", type=float, help="target FD (default: plain SiT's mean FD at the end of the budget)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 avoids the stalls of several threads on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    size = SIZES[size_name(args)]
    if size.problems():
        parser.error("; ".join(size.problems()))
    started = time.perf_counter()
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    digits = Digits.load()
    nets = ensure_small_nets(Path(args.cache), digits, size, print)
    evaluator = Evaluator(nets.evaluator_file, digits, size.num_samples)
    print(f"real digits: FD floor {evaluator.floor:.2f} with {size.num_samples} samples")

    curves = []
    for seed in size.seeds:
        for method in main_methods(size):
            curves.append(train_and_evaluate(method, size, seed, out / f"{method.name}-seed{seed}", digits, nets, evaluator, print))

    if args.target is not None:
        target, target_source = args.target, "given with --target"
    else:
        plain = [c.points[-1]["fd"] for c in curves if c.method == "SiT"]
        target, target_source = sum(plain) / len(plain), "plain SiT's mean FD at the end of the budget"
    rows = summarize(curves, target)
    png = results.parent / "convergence.png"
    plot(curves, target, evaluator.floor, png)
    probes = layer_probes(curves, digits, nets.encoder_file)
    probes_md = probe_table(probes, reference_probes(digits, nets.encoder_file))
    seconds = time.perf_counter() - started
    (out / "convergence.json").write_text(json.dumps({
        "size": dataclasses.asdict(size), "target": target, "floor": evaluator.floor, "small_nets": nets.reports,
        "rows": rows, "curves": [dataclasses.asdict(c) for c in curves],
        "probes": {m: {str(t): v for t, v in p.items()} for m, p in probes.items()},
    }, indent=2))
    write_section(results, "convergence", markdown(
        args, size, nets, evaluator, rows, target, target_source, probes_md, png.name, seconds,
    ))
    print(table(rows, target))
    print("\n".join(speedups(rows)))
    print(f"wrote {results}, {png} and {out / 'convergence.json'} in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
