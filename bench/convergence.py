"""Plain SiT vs SiT + REPA vs SiT + REPA + ERW at small scale: how fast each reaches a sample quality.

    nice -n 5 .venv/bin/python -m bench.convergence          # default size: about 25 minutes on 2 CPU cores
    .venv/bin/python -m bench.convergence --full             # 4x the steps, 2x the batch, 5 seeds, 5x the samples
    .venv/bin/python -m bench.convergence --tiny --out DIR --results FILE   # seconds (the test)
    .venv/bin/python -m bench.convergence --no-train         # redo analyses, picture, markdown from DIR
    .venv/bin/python -m bench.convergence --images faces.npz --resolution 32 --patch 4   # other labelled images
    nice -n 5 .venv/bin/python -m bench.convergence --depth 12 --warmup 400              # another model or budget

The three methods share the model (a 6-block SiT with 2x2-pixel patches on the digits at 16x16,
identity codec), the data order, the batch, the optimiser and the budget of optimizer steps. ERW
spends the first `warmup` steps of its budget on the warmup (the first l2r_depth blocks align to
the encoder on clean images), then trains the full model initialised from it with the decaying
alignment weight; REPA aligns with a constant weight from scratch. Training is done by the
project's trainer (erw.training.trainer.run), evaluation on the EMA weights every `eval_every`
steps: Fréchet distance (FD) in the features of a separately trained evaluator network between
generated digits and all real digits, and the evaluator's class accuracy on generated digits.
With --images, the same study runs on another small labelled dataset: the encoder and the evaluator
are trained on it (cached under a hash of its content), at --resolution with --patch-pixel tokens.
--depth, --l2r-depth, --align-depth, --warmup, --budget-scale and --seeds change the model, the
budget and the seeds; such a study keeps its own run directory, section and picture (their names
end with the flags, e.g. convergence-depth-12-warmup-400), so the digits study's stay as they are.

Reported per method, as mean +- standard deviation over seeds: steps and FLOPs to reach target
FDs (default: what plain SiT reaches after 1/2, 3/4 and all of the budget), FD and accuracy at the
end, and FD by full-model steps (what the warmup buys phase 2). FLOPs are
3x the model's forward FLOPs per trained image (erw.models.sit.flops_per_image, the warmup model
for warmup steps) plus the encoder's forward for alignment targets; the report gives a warmup
step's cost as a fraction of a phase-2 step. Writes DIR/convergence.json, the curves next to FILE
(convergence.png) and the "convergence" section of FILE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.results_md import ROOT, machine, write_section
from bench.smallscale import (
    SIZES,
    Curve,
    DataError,
    Evaluator,
    LabelledImages,
    Size,
    Task,
    add_study_arguments,
    block_features,
    conditioning_strength,
    data_flags,
    encoder_kwargs,
    ensure_small_nets,
    evaluation_step,
    final_model,
    main_methods,
    mean_std,
    model_flags,
    probe_accuracy,
    size_name,
    steps_to_target,
    study_out,
    study_size,
    study_suffix,
    train_all,
    warmup_step_cost,
)
from erw.config import load_config
from erw.models.encoders import ENCODERS, load_encoder
from erw.models.sit import flops_per_image
from erw.training.trainer import build_model

PROBE_TIMES = (0.0, 0.5)
OUT = "runs/bench/convergence"
XL_PRESET = ROOT / "configs" / "imagenet256-sit-xl2.yaml"  # the paper's regime


def reproduce_command(args: argparse.Namespace, size: Size) -> str:
    flag = {"tiny": " --tiny", "full": " --full", "default": ""}[size_name(args)]
    target = f" --target {args.target}" if args.target is not None else ""
    model = model_flags(size, SIZES[size_name(args)])
    return f"nice -n 5 .venv/bin/python -m bench.convergence{flag}{data_flags(size)}{model}{target}"


def xl_warmup_step_cost() -> float:
    """warmup_step_cost at SiT-XL/2 (the preset's L2R depth, encoder and 256px latents), counted
    on the meta device: nothing is allocated."""
    cfg = load_config(XL_PRESET)
    dim = ENCODERS[cfg.encoder.name].dim
    with torch.device("meta"):
        warmup, full = build_model(cfg, "warmup", dim), build_model(cfg, "train", dim)
    return flops_per_image(warmup) / flops_per_image(full)


def data_words(size: Size) -> tuple[str, str]:
    """How the report names the images and their labels: the digits, or the --images set."""
    return ("digits", "digit") if not size.images else (f"images of {size.images}", "class")


# ---------------------------------------------------------------------------------------------
# Summaries.


@dataclass(frozen=True)
class Target:
    fd: float
    source: str


def default_targets(curves: list[Curve], size: Size) -> list[Target]:
    """Plain SiT's mean FD at 1/2, 3/4 and the end of the budget: the quality the baseline reaches
    with that much training, fixed by the baseline alone (the REPA and ERW papers' "reaches
    SiT's quality in N times fewer steps"). One target at the end alone asks for the last few
    percent where every curve flattens, which measures the noise of the last evaluation."""
    plain = [c for c in curves if c.method == "SiT"]
    targets = []
    for fraction, name in ((0.5, "1/2"), (0.75, "3/4"), (1.0, "all")):
        step = evaluation_step(size, fraction)
        if any(t.source.endswith(f"step {step}") for t in targets):
            continue
        fds = [next(p["fd"] for p in c.points if p["step"] == step) for c in plain]
        targets.append(Target(sum(fds) / len(fds), f"plain SiT's mean FD after {name} of the budget, step {step}"))
    return targets


def summarize(curves: list[Curve], targets: list[Target]) -> tuple[list[dict], list[dict]]:
    """(per method and target: steps and FLOPs to reach it; per method: the end of the budget)."""
    methods = list(dict.fromkeys(c.method for c in curves))
    reach = []
    for target in targets:
        for method in methods:
            mine = [c for c in curves if c.method == method]
            steps = [s for s in (steps_to_target(c.points, target.fd, "step") for c in mine) if s is not None]
            flops = [f for f in (steps_to_target(c.points, target.fd, "flops") for c in mine) if f is not None]
            reach.append(
                {
                    "target": target.fd,
                    "method": method,
                    "seeds": len(mine),
                    "reached": len(steps),
                    "steps": mean_std(steps) if steps else None,
                    "flops": mean_std(flops) if flops else None,
                }
            )
    ends = []
    for method in methods:
        mine = [c for c in curves if c.method == method]
        ends.append(
            {
                "method": method,
                "final_fd": mean_std([c.points[-1]["fd"] for c in mine]),
                "final_accuracy": mean_std([c.points[-1]["accuracy"] for c in mine]),
                "budget_flops": mine[0].points[-1]["flops"],
                "seconds": mean_std([c.seconds for c in mine]),
            }
        )
    return reach, ends


def pm(value: tuple[float, float] | None, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    if value is None:
        return "not reached"
    mean, std = value
    return f"{fmt.format(mean * scale)} ± {fmt.format(std * scale)}"


def reach_table(reach: list[dict]) -> str:
    lines = ["| target FD | method | seeds reaching it | steps | GFLOPs |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['target']:.2f} | {r['method']} | {r['reached']}/{r['seeds']} | {pm(r['steps'])} | "
        f"{pm(r['flops'], '{:.0f}', 1e-9)} |"
        for r in reach
    ]
    return "\n".join(lines)


def end_table(ends: list[dict]) -> str:
    lines = [
        "| method | FD at end | class accuracy at end | GFLOPs of the budget | training time (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {pm(r['final_fd'], '{:.2f}')} | {pm(r['final_accuracy'], '{:.1f}%', 100)} | "
        f"{r['budget_flops'] / 1e9:.0f} | {pm(r['seconds'])} |"
        for r in ends
    ]
    return "\n".join(lines)


def speedups(reach: list[dict]) -> list[str]:
    """ERW vs REPA, REPA vs plain, ERW vs plain at every target, in sentences from the numbers alone."""
    out = []
    for target in dict.fromkeys(r["target"] for r in reach):
        by_name = {r["method"]: r for r in reach if r["target"] == target}
        parts = []
        for a, b in (("SiT+REPA+ERW", "SiT+REPA"), ("SiT+REPA", "SiT"), ("SiT+REPA+ERW", "SiT")):
            if a not in by_name or b not in by_name:
                continue
            ra, rb = by_name[a], by_name[b]
            if ra["steps"] is None or rb["steps"] is None:
                parts.append(f"{a} vs {b}: reached on {ra['reached']} and {rb['reached']} seeds")
                continue
            parts.append(
                f"{a} vs {b}: {rb['steps'][0] / ra['steps'][0]:.2f}x in steps, "
                f"{rb['flops'][0] / ra['flops'][0]:.2f}x in FLOPs"
            )
        out.append(f"- FD ≤ {target:.2f}, speed-up (above 1: the first is faster): " + "; ".join(parts) + ".")
    return out


def plot(curves: list[Curve], targets: list[Target], floor: float, size: Size, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in dict.fromkeys(c.method for c in curves):
        mine = [c for c in curves if c.method == method]
        steps = np.array([p["step"] for p in mine[0].points])
        gflops = np.array([p["flops"] for p in mine[0].points]) / 1e9
        for ax, x, key, scale in (
            (axes[0], steps, "fd", 1),
            (axes[1], gflops, "fd", 1),
            (axes[2], steps, "accuracy", 100),
        ):
            values = np.array([[p[key] * scale for p in c.points] for c in mine])
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=method)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for ax in axes[:2]:
        for target in targets:
            ax.axhline(target.fd, color="grey", linestyle="--", linewidth=1)
        ax.axhline(floor, color="black", linestyle=":", linewidth=1, label=f"real-data floor {floor:.2f}")
        ax.plot([], [], color="grey", linestyle="--", linewidth=1, label="targets")
        ax.set_yscale("log")
        ax.set_ylabel("Fréchet distance (evaluator features)")
    axes[0].set_xlabel("optimizer steps (ERW: warmup included)")
    axes[1].set_xlabel("training GFLOPs")
    axes[2].set_xlabel("optimizer steps (ERW: warmup included)")
    axes[2].set_ylabel("class accuracy of samples (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{data_words(size)[0]} {size.resolution}x{size.resolution}, mean ± std over {len({c.seed for c in curves})} seeds"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Where the representation lives.


def analyse_models(report: dict, data: LabelledImages) -> None:
    """Per-block linear probes and conditioning strength of the first seed's final EMA models."""
    seed = report["curves"][0]["seed"]
    probes, conditioning = {}, {}
    for curve in (c for c in report["curves"] if c["seed"] == seed):
        cfg, model = final_model(curve["final_checkpoint"])
        probes[curve["method"]] = {
            f"{t:g}": [probe_accuracy(f, data.labels) for f in block_features(model, cfg.objective.path, data, t)]
            for t in PROBE_TIMES
        }
        conditioning[curve["method"]] = conditioning_strength(model)
    report["probes"], report["conditioning"] = probes, conditioning


def reference_probes(data: LabelledImages, encoder_file: str, resolution: int) -> dict[str, float]:
    """The same probe on raw pixels and on the encoder's mean token: what the numbers mean."""
    from erw.config import EncoderConfig

    encoder = load_encoder(EncoderConfig("timm-file", weights=encoder_file), resolution)
    with torch.no_grad():
        tokens = torch.cat([encoder(data.images[i : i + 500]).mean(dim=1) for i in range(0, len(data.images), 500)])
    return {
        "pixels": probe_accuracy(data.images.flatten(1).float().numpy(), data.labels),
        "encoder": probe_accuracy(tokens.numpy(), data.labels),
    }


def probe_table(probes: dict[str, dict[str, list[float]]], references: dict[str, float]) -> str:
    methods = list(probes)
    times = list(next(iter(probes.values())))
    header = "| block | " + " | ".join(f"{m} t={t}" for m in methods for t in times) + " |"
    lines = [header, "|---" * (1 + len(methods) * len(times)) + "|"]
    for block in range(len(probes[methods[0]][times[0]])):
        cells = [f"{100 * probes[m][t][block]:.1f}%" for m in methods for t in times]
        lines.append(f"| {block + 1} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nReferences (same probe, same split): raw pixels {100 * references['pixels']:.1f}%, "
        f"the encoder's mean token {100 * references['encoder']:.1f}%."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report: everything it shows comes from convergence.json, so --no-train can redo it.


def markdown(report: dict, png_name: str) -> str:
    size = Size.from_json(report["size"])
    enc, ev = report["small_nets"]["encoder"], report["small_nets"]["evaluator"]
    kw = encoder_kwargs(size)
    half_life = dict(o.split("=") for o in main_methods(size)[2].overrides)["objective.align_half_life"]
    curves = [Curve(**c) for c in report["curves"]]
    targets = report_targets(report)
    reach, ends = summarize(curves, targets)
    images, label = data_words(size)
    real = "digits" if not size.images else "images"
    count = report.get("num_images", size.num_digits or 1797)
    base = SIZES[report["size_name"]]
    flags = model_flags(size, base)
    xl = load_config(XL_PRESET)
    scale = f" ({size.budget / base.budget:g}x the {report['size_name']} size's)" if size.budget != base.budget else ""
    return "\n".join(
        [
            f"## Convergence: plain SiT vs SiT+REPA vs SiT+REPA+ERW ({report['size_name']} size{',' if flags else ''}{flags})",
            "",
            f"Reproduce: `{report['command']}` — this run: {report['seconds'] / 60:.0f} min on {report['machine']}.",
            "",
            f"Setup (identical for the three methods unless said): {count} {images} at {size.resolution}x{size.resolution} (identity "
            f"codec: the model denoises pixels), SiT with {size.depth} blocks, width {size.hidden}, {size.heads} heads, "
            f"{size.patch}x{size.patch}-pixel patches ({(size.resolution // size.patch) ** 2} tokens), batch {size.batch}, AdamW lr "
            f"{size.lr:g}, EMA {size.ema_decay}, fp32, budget {size.budget} optimizer steps{scale}, seeds "
            f"{', '.join(map(str, size.seeds))}. REPA: projector after block {size.align_depth}, constant weight c0 = 1 "
            f"from step 0. ERW: {size.warmup} warmup steps of the budget train blocks 1-{size.l2r_depth} to match the "
            f"encoder on clean images, then {size.budget - size.warmup} steps of the full model initialised from them, "
            f"weight c0 * 2^(-(s - W) / {half_life}); a warmup step ({size.l2r_depth} of {size.depth} blocks at t = 0 "
            f"plus the projector) costs {warmup_step_cost(size):.2f}x the FLOPs of a REPA or ERW phase-2 step "
            f"({xl_warmup_step_cost():.2f}x at SiT-XL/2, {xl.model.l2r_depth} of {xl.model.dims()[0]} blocks). "
            f"Encoder: a {kw['depth']}-block ViT (width {kw['embed_dim']}, "
            f"{kw['patch_size']}x{kw['patch_size']}-pixel patches) trained supervised on the {label} labels (a linear "
            f"classifier on its mean patch token), {100 * enc['val_accuracy']:.1f}% held-out accuracy; its tokens of the "
            f"dataset are computed once (their FLOPs are counted). Evaluator: a CNN (other architecture, seed and split), "
            f"{100 * ev['val_accuracy']:.1f}% held-out accuracy; FD between {size.num_samples} class-balanced samples (Heun "
            f"ODE, {size.sample_steps} steps, no guidance, the same noise for every model) and all real {real} in its "
            f"{report['evaluator_dim']}-d penultimate features. {size.num_samples} real {real} score FD "
            f"{report['floor']:.2f} (the floor).",
            "",
            "Targets: " + "; ".join(f"FD ≤ {t.fd:.2f} ({t.source})" for t in targets) + ". Steps and FLOPs to a target "
            f"are read off each curve (evaluations every {size.eval_every} steps, linear between the last one above the "
            "target and the first at or below it), mean ± std over the seeds that reached it. FLOPs: 3x the forward "
            "FLOPs of the trained model per image (the warmup model for warmup steps), plus the encoder's tokens of the "
            "dataset once for REPA and ERW.",
            "",
            reach_table(reach),
            "",
            *speedups(reach),
            "",
            "At the end of the budget:",
            "",
            end_table(ends),
            "",
            f"![convergence curves]({png_name})",
            "",
            "### Phase 2 from the warmup vs from scratch",
            "",
            f"FD after the same number of full-model (phase 2) steps, mean over seeds: ERW's phase 2 starts from the "
            f"warmed-up blocks after its {size.warmup} warmup steps; REPA's and plain SiT's start from scratch.",
            "",
            phase2_table(curves, size),
            "",
            "### Where the representation lives: linear probe per block",
            "",
            f"Held-out accuracy (30% of the {real}) of a linear probe (ridge classifier on standardised features) on each "
            f"block's mean token of the first seed's final EMA model, on {real} noised to time t, given the null class "
            "label (the class label would hand the probe the answer).",
            "",
            probe_table(report["probes"], report["reference_probes"]),
            "",
            "### How much the class label can steer",
            "",
            "The label and the time enter every block's adaLN conditioning as the sum of two embeddings. Spread of the "
            "class embeddings (mean distance to their centre) against the norm of the timestep embedding (mean over t), "
            "first seed's final EMA model:",
            "",
            "| method | class-embedding spread | timestep-embedding norm | ratio |",
            "|---|---|---|---|",
            *(
                f"| {m} | {c['class_spread']:.2f} | {c['time_norm']:.2f} | {c['class_spread'] / c['time_norm']:.3f} |"
                for m, c in report["conditioning"].items()
            ),
        ]
    )


def run_study(args: argparse.Namespace, size: Size) -> dict:
    started = time.perf_counter()
    out = study_out(args, size, OUT)
    out.mkdir(parents=True, exist_ok=True)
    data = LabelledImages.load(size)
    size = dataclasses.replace(size, num_classes=data.num_classes)
    nets = ensure_small_nets(Path(args.cache), data, size, print)
    evaluator = Evaluator(nets.evaluator_file, data, size.num_samples)
    print(
        f"{len(data.labels)} {data.name} images, {data.num_classes} classes: FD floor {evaluator.floor:.2f} "
        f"with {size.num_samples} samples"
    )
    print(
        f"SiT with {size.depth} blocks, L2R depth {size.l2r_depth}: a warmup step costs "
        f"{warmup_step_cost(size):.2f}x the FLOPs of a phase-2 step ({xl_warmup_step_cost():.2f}x at SiT-XL/2)"
    )

    tasks = [Task(m, seed, out / f"{m.name}-seed{seed}") for seed in size.seeds for m in main_methods(size)]
    curves = train_all(tasks, size, nets, args.jobs, args.threads)

    return {
        "size_name": size_name(args),
        "command": reproduce_command(args, size),
        "machine": machine(),
        "num_images": len(data.labels),
        "data_fingerprint": data.fingerprint(),
        "size": dataclasses.asdict(size),
        "given_target": args.target,
        "floor": evaluator.floor,
        "evaluator_dim": evaluator.dim,
        "small_nets": nets.reports,
        "curves": [dataclasses.asdict(c) for c in curves],
        "encoder_file": nets.encoder_file,
        "seconds": time.perf_counter() - started,
    }


def report_targets(report: dict) -> list[Target]:
    if report.get("given_target") is not None:
        return [Target(report["given_target"], "given with --target")]
    size = Size.from_json(report["size"])
    return default_targets([Curve(**c) for c in report["curves"]], size)


def phase2_table(curves: list[Curve], size: Size) -> str:
    """FD by full-model steps taken, ERW's warmup not counted: what the warmup buys phase 2."""

    def fd_after(method: str, full_steps: int) -> float | None:
        offset = size.warmup if method == "SiT+REPA+ERW" else 0
        fds = [p["fd"] for c in curves if c.method == method for p in c.points if p["step"] == offset + full_steps]
        return sum(fds) / len(fds) if fds else None

    methods = list(dict.fromkeys(c.method for c in curves))
    lines = ["| full-model steps | " + " | ".join(methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for full_steps in range(size.eval_every, size.budget - size.warmup + 1, size.eval_every):
        cells = [fd_after(m, full_steps) for m in methods]
        lines.append(f"| {full_steps} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(
        parser,
        out=OUT,
        tiny="a few steps of a tiny model: checks the whole path",
        full="4x the steps at twice the batch, 5 seeds, 1000 samples",
        no_train="reuse DIR/convergence.json and its runs' final checkpoints: redo the analyses it lacks, "
        "the picture and the markdown",
    )
    parser.add_argument(
        "--target", type=float, help="one target FD (default: plain SiT's mean FD after 1/2, 3/4 and all of the budget)"
    )
    parser.add_argument("--seeds", type=int, help="train seeds 0..N-1 (default: the size's, 3 or 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = study_size(args, args.seeds)
    if size.problems():
        parser.error("; ".join(size.problems()))

    suffix = study_suffix(size, SIZES[size_name(args)])
    report_file, results = study_out(args, size, OUT) / "convergence.json", Path(args.results)
    if args.no_train:
        if not report_file.exists():
            parser.error(f"--no-train: {report_file} does not exist; run the study first")
        report = json.loads(report_file.read_text())
        report["given_target"] = args.target
    else:
        try:
            report = run_study(args, size)
        except DataError as err:
            parser.error(str(err))
    if not {"probes", "conditioning", "reference_probes"} <= set(report):
        size = Size.from_json(report["size"])
        data = LabelledImages.load(size)
        analyse_models(report, data)
        report["reference_probes"] = reference_probes(data, report["encoder_file"], size.resolution)
    report_file.write_text(json.dumps(report, indent=2))
    curves = [Curve(**c) for c in report["curves"]]
    png = results.parent / f"convergence{suffix}.png"
    targets = report_targets(report)
    plot(curves, targets, report["floor"], Size.from_json(report["size"]), png)
    write_section(results, f"convergence{suffix}", markdown(report, png.name))
    reach, ends = summarize(curves, targets)
    print(reach_table(reach), end_table(ends), *speedups(reach), sep="\n")
    print(f"a warmup step costs {warmup_step_cost(Size.from_json(report['size'])):.2f}x the FLOPs of a phase-2 step")
    print(f"wrote {results}, {png} and {report_file}")


if __name__ == "__main__":
    main()
