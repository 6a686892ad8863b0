"""What ERW's result depends on, at the convergence study's scale: one setting at a time.

    nice -n 5 .venv/bin/python -m bench.sweeps              # default size, seed 0
    .venv/bin/python -m bench.sweeps --tiny --out DIR --results FILE
    .venv/bin/python -m bench.sweeps --only l2r_depth,warmup
    .venv/bin/python -m bench.sweeps --no-train          # redo the markdown from DIR/sweeps.json

Around the default SiT+REPA+ERW of bench/convergence.py (same model, data, batch, budget):

    l2r_depth  blocks trained in the warmup: where does the representation-processing region end?
    warmup     warmup steps taken from the budget
    c0         alignment weight, for ERW and for REPA
    schedule   ERW with a constant weight: separates the warmup from the decaying weight
    encoder    an untrained encoder of the same architecture: how much the representation matters

Every point is one run (seed 0; the convergence study's seed spread is the noise level to read
them against), with plain SiT, REPA and ERW at the defaults as references: taken from the
convergence study's json (--references) when it ran the same size, trained here otherwise. The
target FD is plain SiT's FD after 3/4 of the budget, mid-curve where the methods differ. Writes DIR/sweeps.json and the "sweeps"
section of FILE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench.results_md import machine, write_section
from bench.smallscale import (
    SIZES,
    Curve,
    DataError,
    LabelledImages,
    Method,
    Size,
    Task,
    add_study_arguments,
    data_flags,
    ensure_small_nets,
    evaluation_step,
    main_methods,
    model_flags,
    size_name,
    steps_to_target,
    study_out,
    study_size,
    study_suffix,
    train_all,
    untrained_encoder,
)

KNOBS = ("l2r_depth", "warmup", "c0", "schedule", "encoder")
OUT, CONVERGENCE_OUT = "runs/bench/sweeps", "runs/bench/convergence"


def sweep_points(size: Size, untrained_file: str, tiny: bool) -> dict[str, list[tuple[str, Method]]]:
    """knob -> [(value, method)], the defaults left out (they are the reference runs)."""
    plain, repa, erw = main_methods(size)

    def erw_with(warmup: int = size.warmup, extra: tuple[str, ...] = ()) -> Method:
        half_life = max(1, (size.budget - warmup) // 2)
        overrides = ("objective.align_schedule=decay", f"objective.align_half_life={half_life}", *extra)
        return Method(erw.name, align=True, warmup=warmup, overrides=overrides)

    candidates = dict.fromkeys((1, size.depth - 2, size.l2r_depth + 1))  # shallower, deeper, next
    depths = [d for d in candidates if d != size.l2r_depth and 1 <= d < size.depth][:2]
    warmups = [w for w in (size.warmup // 2, size.warmup * 2) if 0 < w < size.budget and w % size.eval_every == 0]
    coeffs = (2.0,)
    if tiny:  # one value per knob: the test checks the path, not the science
        depths, warmups, coeffs = depths[:1], warmups[:1] or [size.warmup], coeffs[:1]
    return {
        "l2r_depth": [(str(d), erw_with(extra=(f"model.l2r_depth={d}",))) for d in depths],
        "warmup": [(str(w), erw_with(warmup=w)) for w in warmups],
        "c0": [
            (f"{c:g}", m)
            for c in coeffs
            for m in (
                dataclasses.replace(repa, overrides=repa.overrides + (f"objective.align_coeff={c}",)),
                erw_with(extra=(f"objective.align_coeff={c}",)),
            )
        ],
        "schedule": [("constant", erw_with(extra=("objective.align_schedule=constant",)))],
        "encoder": [
            ("untrained", m)
            for m in (
                dataclasses.replace(repa, overrides=repa.overrides + (f"encoder.weights={untrained_file}",)),
                erw_with(extra=(f"encoder.weights={untrained_file}",)),
            )
        ],
    }


def reference_curves(path: Path, size: Size, seed: int) -> dict[str, Curve] | None:
    """The convergence study's runs of this seed, if it ran this size (the trainer is
    deterministic: training them again would give the same curves)."""
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    if Size.from_json(report["size"]) != size:
        return None
    curves = {c["method"]: Curve(**c) for c in report["curves"] if c["seed"] == seed}
    return curves if len(curves) == len(main_methods(size)) else None


def describe(curve: Curve, target: float, budget: int) -> dict[str, float | None]:
    half = next(p for p in curve.points if p["step"] >= budget // 2)
    return {
        "steps": steps_to_target(curve.points, target),
        "gflops": steps_to_target(curve.points, target, "flops"),
        "fd_half": half["fd"],
        "half_step": half["step"],
        "fd_end": curve.points[-1]["fd"],
        "accuracy_end": curve.points[-1]["accuracy"],
    }


def row(knob: str, value: str, method: str, d: dict) -> str:
    reached = "not reached | not reached" if d["steps"] is None else f"{d['steps']:.0f} | {d['gflops'] / 1e9:.0f}"
    return (
        f"| {knob} | {value} | {method} | {reached} | {d['fd_half']:.2f} (step {d['half_step']:.0f}) | "
        f"{d['fd_end']:.2f} | {100 * d['accuracy_end']:.1f}% |"
    )


def render(report: dict) -> str:
    """The "sweeps" section, from sweeps.json alone (so --no-train can redo it)."""
    size = Size.from_json(report["size"])
    references = {n: Curve(**c) for n, c in report["references"].items()}
    # Mid-curve, where the methods differ most: plain SiT's FD after 3/4 of the budget (this seed).
    target_step = evaluation_step(size, 0.75)
    target = next(p["fd"] for p in references["SiT"].points if p["step"] >= target_step)
    name = report.get("size_name", "default")
    flag = {"tiny": " --tiny", "full": " --full"}.get(name, "") + data_flags(size) + model_flags(size, SIZES[name])
    took = f" — this run: {report['minutes']:.0f} min on {report['machine']}" if "minutes" in report else ""
    lines = [
        f"## Sweeps around SiT+REPA+ERW ({name} size{model_flags(size, SIZES[name])}, seed {report['seed']})",
        "",
        f"Reproduce: `nice -n 5 .venv/bin/python -m bench.sweeps{flag}`{took}.",
        "",
        f"Same setup as the convergence study; one knob changed at a time, one seed (read the differences against "
        f"the convergence study's spread over seeds). Target: FD ≤ {target:.2f} (plain SiT's FD at step "
        f"{target_step}, 3/4 of the budget, this seed). Defaults: l2r_depth {size.l2r_depth}, warmup {size.warmup} of "
        f"{size.budget} steps, c0 = 1, decaying weight for ERW and constant for REPA, the trained encoder.",
        "",
        f"| knob | value | method | steps to FD ≤ {target:.2f} | GFLOPs to it | FD at half budget | FD at end | "
        "accuracy at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [row("reference", "default", name, describe(c, target, size.budget)) for name, c in references.items()]
    for knob, runs in report["sweeps"].items():
        lines += [row(knob, r["value"], r["method"], describe(Curve(**r["curve"]), target, size.budget)) for r in runs]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(
        parser,
        out=OUT,
        tiny="one value per knob on a tiny model: checks the path",
        full="the --full size of the convergence study",
        no_train="redo the markdown from DIR/sweeps.json",
    )
    parser.add_argument("--only", default=",".join(KNOBS), help=f"comma-separated knobs from {', '.join(KNOBS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--references",
        help="convergence study results whose runs of --seed serve as the default points (default: "
        f"{CONVERGENCE_OUT}/convergence.json, the directory followed by the model flags like --out)",
    )
    args = parser.parse_args()
    knobs = [k for k in args.only.split(",") if k]
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        parser.error(f"unknown knob(s) {', '.join(unknown)}: choose from {', '.join(KNOBS)}")
    torch.set_num_threads(args.threads)

    size = study_size(args)
    if size.problems():
        parser.error("; ".join(size.problems()))
    out = study_out(args, size, OUT)
    report_file = out / "sweeps.json"
    if args.no_train:
        if not report_file.exists():
            parser.error(f"--no-train: {report_file} does not exist; run the sweeps first")
        report = json.loads(report_file.read_text())
    else:
        try:
            report = run_sweeps(args, size, knobs)
        except DataError as err:
            parser.error(str(err))
        out.mkdir(parents=True, exist_ok=True)
        report_file.write_text(json.dumps(report, indent=2))
    section = render(report)
    write_section(args.results, "sweeps" + study_suffix(size, SIZES[size_name(args)]), section)
    print(section)
    print(f"wrote {args.results}" + ("" if args.no_train else f" and {report_file}"))


def run_sweeps(args: argparse.Namespace, size: Size, knobs: list[str]) -> dict:
    started = time.perf_counter()
    out = study_out(args, size, OUT)
    data = LabelledImages.load(size)
    size = dataclasses.replace(size, num_classes=data.num_classes)
    nets = ensure_small_nets(Path(args.cache), data, size, print)
    points = sweep_points(size, untrained_encoder(Path(args.cache), size), args.tiny)
    labelled = [(k, value, method) for k in knobs for value, method in points[k]]
    tasks = [Task(method, args.seed, out / f"{k}-{value}-{method.name}") for k, value, method in labelled]
    default_references = Path(CONVERGENCE_OUT + study_suffix(size, SIZES[size_name(args)])) / "convergence.json"
    references_file = Path(args.references) if args.references else default_references
    references = reference_curves(references_file, size, args.seed)
    if references:
        print(f"default points: seed {args.seed} of {references_file}")
    else:
        tasks += [Task(m, args.seed, out / f"reference-{m.name}") for m in main_methods(size)]
    curves = train_all(tasks, size, nets, args.jobs, args.threads)
    sweeps: dict[str, list[dict]] = {k: [] for k in knobs}
    for (k, value, method), curve in zip(labelled, curves):
        sweeps[k].append({"value": value, "method": method.name, "curve": dataclasses.asdict(curve)})
    if not references:
        references = {c.method: c for c in curves[len(labelled) :]}
    return {
        "size_name": size_name(args),
        "size": dataclasses.asdict(size),
        "seed": args.seed,
        "machine": machine(),
        "minutes": (time.perf_counter() - started) / 60,
        "references": {n: dataclasses.asdict(c) for n, c in references.items()},
        "sweeps": sweeps,
    }


if __name__ == "__main__":
    main()
