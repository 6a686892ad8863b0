"""The benchmark report scripts: the convergence study end to end at --tiny size, its bookkeeping,
the results page sections and the GPU check's refusal and table."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import gpu_check
from bench.results_md import ROOT, write_section
from bench.smallscale import SIZES, DataError, ImageBatches, LabelledImages, Size, steps_to_target


@pytest.mark.bench
def test_convergence_tiny_end_to_end(tmp_path):
    results = tmp_path / "docs" / "results.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.convergence",
            "--tiny",
            "--out",
            str(tmp_path / "runs"),
            "--cache",
            str(tmp_path / "cache"),
            "--results",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "convergence.json").read_text())
    curves = report["curves"]
    assert sorted({(c["method"], c["seed"]) for c in curves}) == sorted(
        (m, s) for m in ("SiT", "SiT+REPA", "SiT+REPA+ERW") for s in (0, 1, 2)
    )
    size = report["size"]
    by_method = {c["method"]: c for c in curves if c["seed"] == 0}
    # Plain SiT and REPA are evaluated from the first segment on; ERW after its warmup, on the same grid.
    assert [p["step"] for p in by_method["SiT"]["points"]] == list(
        range(size["eval_every"], size["budget"] + 1, size["eval_every"])
    )
    assert [p["step"] for p in by_method["SiT+REPA+ERW"]["points"]] == list(
        range(size["warmup"] + size["eval_every"], size["budget"] + 1, size["eval_every"])
    )
    # The warmup is priced as warmup steps: ERW spends fewer FLOPs than REPA for the same step budget,
    # and REPA more than plain SiT (its projector, and the encoder's tokens of the dataset).
    end = {m: c["points"][-1]["flops"] for m, c in by_method.items()}
    assert end["SiT+REPA+ERW"] < end["SiT+REPA"] and end["SiT"] < end["SiT+REPA"]
    assert all(p["fd"] >= 0 and 0 <= p["accuracy"] <= 1 for c in curves for p in c["points"])

    text = results.read_text()
    assert "<!-- BEGIN convergence -->" in text and "python -m bench.convergence --tiny" in text
    for method in ("| SiT |", "| SiT+REPA |", "| SiT+REPA+ERW |"):
        assert method in text
    assert "linear probe per block" in text and "How much the class label can steer" in text
    assert "Phase 2 from the warmup vs from scratch" in text and "| target FD | method |" in text
    png = results.parent / "convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The small networks are cached: a second study would reuse them.
    assert len(list((tmp_path / "cache").glob("digits-encoder-*.safetensors"))) == 1

    # A sweep reuses the study's runs of its seed as the reference points and trains only its own.
    common = [
        "--tiny",
        "--cache",
        str(tmp_path / "cache"),
        "--results",
        str(results),
        "--out",
        str(tmp_path / "sweeps"),
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sweeps",
            *common,
            "--only",
            "l2r_depth",
            "--references",
            str(tmp_path / "runs" / "convergence.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "default points: seed 0 of" in done.stdout
    assert [d.name for d in (tmp_path / "sweeps").iterdir() if d.is_dir()] == ["l2r_depth-2-SiT+REPA+ERW"]
    text = results.read_text()
    assert "<!-- BEGIN sweeps -->" in text and "| l2r_depth | 2 | SiT+REPA+ERW |" in text
    assert "<!-- BEGIN convergence -->" in text  # the other section is kept

    # Both pages can be redone from their json without training.
    (tmp_path / "runs" / "SiT-seed0").rename(tmp_path / "moved")  # the rendering must not need the curves' runs
    for study in ("convergence", "sweeps"):
        out = tmp_path / ("runs" if study == "convergence" else "sweeps")
        done = subprocess.run(
            [sys.executable, "-m", f"bench.{study}", *common[:-2], "--out", str(out), "--no-train"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]


def test_steps_to_target_interpolates_the_crossing():
    points = [
        {"step": 10, "flops": 1.0, "fd": 5.0},
        {"step": 20, "flops": 2.0, "fd": 3.0},
        {"step": 30, "flops": 3.0, "fd": 2.0},
    ]
    assert steps_to_target(points, 3.0) == 20
    assert steps_to_target(points, 6.0) == 10  # already below at the first evaluation
    assert steps_to_target(points, 2.5, "flops") == 2.5  # halfway from FD 3 to FD 2
    assert steps_to_target(points, 1.0) is None


def test_image_batches_resume_where_they_stopped():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 4, 4).contiguous()
    digits = LabelledImages(images, torch.arange(50) % 10, "digits")
    straight = iter(ImageBatches(digits, 8, seed=3))
    batches = [next(straight)["label"] for _ in range(10)]  # crosses an epoch boundary (50 images)
    first = ImageBatches(digits, 8, seed=3)
    it = iter(first)
    for _ in range(4):
        next(it)
    resumed = ImageBatches(digits, 8, seed=3)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    assert all(torch.equal(next(it)["label"], b) for b in batches[4:])
    epoch = torch.cat(batches)[:48]
    assert len(set(epoch.tolist())) == 10  # a permutation, not draws with replacement


def test_results_sections_are_replaced_in_place(tmp_path):
    page = tmp_path / "results.md"
    write_section(page, "throughput", "## Throughput\nold")
    write_section(page, "convergence", "## Convergence\none")
    page.write_text(page.read_text() + "\nNotes written by hand.\n")
    write_section(page, "throughput", "## Throughput\nnew")
    text = page.read_text()
    assert text.index("Convergence") < text.index("Throughput")  # the page keeps its order
    assert "new" in text and "old" not in text and "Notes written by hand." in text
    assert text.count("<!-- BEGIN throughput -->") == 1


def test_gpu_check_refuses_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr and done.stdout == ""


def test_gpu_check_table():
    rows = [
        gpu_check.Measurement("full", "eager", 32, 0.5, 1e12, 40.0),
        gpu_check.Measurement("full", "compiled", 32, 0.25, 1e12, 30.0),
        gpu_check.Measurement("warmup", "eager", 32, 0.1, 2e11, 10.0),
        gpu_check.Measurement("warmup", "compiled", 32, None, 2e11, note="skipped: time limit"),
    ]
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA L40S") == 362.0 and gpu_check.peak_tflops("NVIDIA L40") is None
    assert gpu_check.peak_tflops("Some Future GPU") is None
    table = gpu_check.summary_table(rows, "NVIDIA H100 80GB HBM3", 989.0)
    # 32 images / 0.25 s = 128 images/s x 1e12 FLOPs = 128 TFLOPS = 12.9% of 989.
    assert "| full | compiled | 32 | 128.0 | 250.0 | 128.0 | 12.9% | 30.0 |" in table
    assert "skipped: time limit" in table
    assert "compiled/eager full step: 2.00x" in table and "warmup/full step time (eager): 0.20" in table


def test_gpu_check_runs_its_measurements_on_cpu(capsys):
    tiny = [
        "model.depth=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.align_depth=1",
        "model.l2r_depth=1",
        "model.projector_dim=16",
        "model.num_classes=10",
    ]
    assert (
        gpu_check.main(["--cpu", "--batch", "2", "--steps", "1", "--warmup-steps", "1", "--modes", "eager", *tiny]) == 0
    )
    out = capsys.readouterr().out
    assert "| full | eager | 2 |" in out and "| warmup | eager | 2 |" in out and "n/a" in out
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu", "--modes", "fast"])


def test_sweep_points_change_one_setting_at_a_time():
    from bench.sweeps import sweep_points

    size = SIZES["default"]
    points = sweep_points(size, "untrained.safetensors", tiny=False)
    assert [v for v, _ in points["l2r_depth"]] == ["1", "4"]
    assert all(f"model.l2r_depth={v}" in m.overrides and m.warmup == size.warmup for v, m in points["l2r_depth"])
    assert [(v, m.warmup) for v, m in points["warmup"]] == [("400", 400), ("1600", 1600)]
    # ERW's half-life follows its phase 2: half of what is left of the budget after the warmup.
    assert "objective.align_half_life=800" in points["warmup"][1][1].overrides
    assert {m.name for _, m in points["c0"]} == {"SiT+REPA", "SiT+REPA+ERW"}
    assert all("encoder.weights=untrained.safetensors" in m.overrides for _, m in points["encoder"])
    erw_constant = points["schedule"][0][1]
    assert erw_constant.overrides[-1] == "objective.align_schedule=constant" and erw_constant.warmup == size.warmup


def test_run_all_reports_each_benchmark_with_its_state():
    from bench import run_all

    outcomes = [
        run_all.Outcome("step_throughput", "python -m bench.step_throughput --no-compile", 0, 12.0, "SiT-S/2 0.39x"),
        run_all.Outcome("loader_throughput", "python -m bench.loader_throughput", -1, 1800.0, "timed out after 1800 s"),
        run_all.Outcome("metrics_overhead", "python -m bench.metrics_overhead", 3, 5.0, "Traceback ..."),
    ]
    text = run_all.section(outcomes)
    assert "### step_throughput (ok, 12 s)" in text and "`python -m bench.step_throughput --no-compile`" in text
    assert "### loader_throughput (TIMED OUT, 1800 s)" in text
    assert "### metrics_overhead (FAILED (exit 3), 5 s)" in text
    # Every benchmark it names exists, and its arguments are ones the script accepts.
    for name, arguments in run_all.BENCHMARKS.items():
        script = ROOT / "bench" / f"{name}.py"
        assert all(a in script.read_text() for a in arguments), (name, arguments)


# ---------------------------------------------------------------------------------------------
# The study on another dataset (--images): a tiny one made here, of three shapes.


def _shapes(n_per_class: int = 30, side: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright squares, crosses and rings on dark noise, at random offsets: uint8 [N, side, side, 3], labels 0-2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            cy, cx = rng.integers(5, side - 5, size=2)
            if label == 0:
                mask = (abs(yy - cy) <= 3) & (abs(xx - cx) <= 3)
            elif label == 1:
                mask = ((abs(yy - cy) <= 4) & (abs(xx - cx) <= 1)) | ((abs(xx - cx) <= 4) & (abs(yy - cy) <= 1))
            else:
                mask = abs(np.hypot(yy - cy, xx - cx) - 3.5) <= 1.0
            pixels = rng.integers(0, 40, size=(side, side, 3)) + 200 * mask[..., None]
            images.append(pixels.clip(0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_other_images_load_from_npz_folder_and_shards_alike(tmp_path):
    from PIL import Image

    images, labels = _shapes()
    np.savez(tmp_path / "shapes.npz", images=images, labels=labels)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        (tmp_path / "folder" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "folder" / f"c{label}" / f"{i:03d}.png")
    size = Size.from_json({**dataclasses.asdict(SIZES["tiny"]), "num_digits": 0})
    from_npz = LabelledImages.load(dataclasses.replace(size, images=str(tmp_path / "shapes.npz")))
    from_folder = LabelledImages.load(dataclasses.replace(size, images=str(tmp_path / "folder")))
    assert from_npz.images.shape == (90, 3, 16, 16) and from_npz.num_classes == 3 and from_npz.name == "shapes"
    assert sorted(from_folder.labels.tolist()) == sorted(from_npz.labels.tolist())
    # Resized to --resolution; the content hash (the small networks' cache key) follows the pixels.
    smaller = LabelledImages.load(dataclasses.replace(size, images=str(tmp_path / "shapes.npz"), resolution=8))
    assert smaller.images.shape[-1] == 8 and smaller.fingerprint() != from_npz.fingerprint()
    np.savez(tmp_path / "unlabelled.npz", arr_0=images)
    with pytest.raises(DataError, match="expected `images`"):
        LabelledImages.load(dataclasses.replace(size, images=str(tmp_path / "unlabelled.npz")))
    np.savez(tmp_path / "gap.npz", images=images, labels=np.where(labels == 1, 2, labels))
    with pytest.raises(DataError, match=r"no images of class\(es\) \[1\]"):
        LabelledImages.load(dataclasses.replace(size, images=str(tmp_path / "gap.npz")))


@pytest.mark.bench
def test_convergence_tiny_on_another_dataset(tmp_path):
    images, labels = _shapes()
    np.savez(tmp_path / "shapes.npz", images=images, labels=labels)
    results = tmp_path / "results.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.convergence",
            "--tiny",
            "--images",
            str(tmp_path / "shapes.npz"),
            "--resolution",
            "8",
            "--patch",
            "2",
            "--out",
            str(tmp_path / "runs"),
            "--cache",
            str(tmp_path / "cache"),
            "--results",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "convergence.json").read_text())
    assert report["size"]["num_classes"] == 3 and report["size"]["resolution"] == 8 and report["num_images"] == 90
    assert report["command"].endswith(f"--tiny --images {tmp_path / 'shapes.npz'} --resolution 8")
    # The encoder and the evaluator were trained on these images, cached under their content hash.
    assert [p.name.split("-")[:2] for p in (tmp_path / "cache").glob("shapes-*")] != []
    assert {p.name.split("-")[1] for p in (tmp_path / "cache").glob("shapes-*")} == {"encoder", "evaluator"}
    text = results.read_text()
    assert f"90 images of {tmp_path / 'shapes.npz'} at 8x8" in text and "(16 tokens)" in text


# ---------------------------------------------------------------------------------------------
# Another model or budget (--depth, --l2r-depth, --align-depth, --warmup, --budget-scale, --seeds).


def _study_parser():
    import argparse

    from bench.smallscale import add_study_arguments

    parser = argparse.ArgumentParser()
    add_study_arguments(parser, out="runs/bench/x", tiny="", full="", no_train="")
    return parser


def test_model_flags_round_trip_and_leave_the_digits_study_alone():
    from bench.smallscale import model_flags, study_size, study_suffix, warmup_step_cost

    parser = _study_parser()
    default = study_size(parser.parse_args([]))
    assert (
        default == SIZES["default"]
        and model_flags(default, SIZES["default"]) == ""
        and study_suffix(default, SIZES["default"]) == ""
    )
    deep = study_size(
        parser.parse_args(["--depth", "12", "--l2r-depth", "2", "--warmup", "400", "--budget-scale", "2"]), seeds=1
    )
    assert (deep.depth, deep.l2r_depth, deep.align_depth, deep.warmup, deep.budget, deep.eval_every, deep.seeds) == (
        12,
        2,
        3,
        400,
        6400,
        400,
        (0,),
    )
    flags = model_flags(deep, SIZES["default"])
    assert flags == " --depth 12 --warmup 400 --budget-scale 2 --seeds 1"  # l2r depth 2 is the default's
    assert study_suffix(deep, SIZES["default"]) == "-depth-12-warmup-400-budget-scale-2-seeds-1"
    words = flags.split()
    assert study_size(parser.parse_args(words[:-2]), seeds=int(words[-1])) == deep  # the flags give the size back
    # The FLOPs of a warmup step follow the depth: 0.48x a full step at 6 blocks (issue 14), less at 12.
    assert round(warmup_step_cost(default), 2) == 0.48
    assert warmup_step_cost(deep) < 0.3
    for bad, message in (
        (["--depth", "2"], "l2r_depth=2 must be at least 1 and less than the model depth 2"),
        (["--align-depth", "7"], "align_depth=7 is outside the model"),
        (["--budget-scale", "1.1"], "must be multiples of eval_every"),
        (["--warmup", "3200"], "must be inside the budget"),
    ):
        assert any(message in p for p in study_size(parser.parse_args(bad)).problems()), bad


@pytest.mark.bench
def test_convergence_tiny_with_model_flags(tmp_path):
    from bench.smallscale import Size, warmup_step_cost
    from erw.training import checkpoint as ckpt

    results = tmp_path / "results.md"
    write_section(results, "convergence", "## Convergence\nthe digits study")
    flags = [
        "--depth",
        "4",
        "--l2r-depth",
        "2",
        "--align-depth",
        "3",
        "--warmup",
        "4",
        "--budget-scale",
        "2",
        "--seeds",
        "1",
    ]
    done = subprocess.run(  # from another directory: the run directory's default follows the flags
        [sys.executable, "-m", "bench.convergence", "--tiny", *flags, "--results", str(results)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    suffix = "-depth-4-l2r-depth-2-align-depth-3-warmup-4-budget-scale-2-seeds-1"
    report = json.loads((tmp_path / "runs" / "bench" / f"convergence{suffix}" / "convergence.json").read_text())
    assert report["command"].endswith("bench.convergence --tiny " + " ".join(flags))
    size = report["size"]
    assert (size["depth"], size["l2r_depth"], size["align_depth"], size["warmup"], size["budget"], size["seeds"]) == (
        4,
        2,
        3,
        4,
        8,
        [0],
    )
    curves = {c["method"]: c for c in report["curves"]}
    assert sorted(curves) == ["SiT", "SiT+REPA", "SiT+REPA+ERW"] and {c["seed"] for c in report["curves"]} == {0}
    assert [p["step"] for p in curves["SiT"]["points"]] == [2, 4, 6, 8]  # twice the budget, the same grid
    assert [p["step"] for p in curves["SiT+REPA+ERW"]["points"]] == [6, 8]
    # The flags reached every run's config (as its checkpoint recorded it).
    for method, curve in curves.items():
        cfg = ckpt.load_checkpoint(str(tmp_path / curve["final_checkpoint"]), with_train_state=False).config()
        assert (cfg.model.depth, cfg.model.l2r_depth, cfg.model.align_depth) == (4, 2, 3), method
        assert cfg.train.steps == (4 if method == "SiT+REPA+ERW" else 8), method
    erw = ckpt.load_checkpoint(
        str(tmp_path / curves["SiT+REPA+ERW"]["final_checkpoint"]), with_train_state=False
    ).config()
    assert erw.objective.align_half_life == 2  # half of its phase 2
    # The FLOPs on the curves price a warmup step at the fraction the report gives.
    repa, warm = ({p["step"]: p["flops"] for p in curves[m]["points"]} for m in ("SiT+REPA", "SiT+REPA+ERW"))
    full_step = (repa[4] - repa[2]) / 2
    warmup_step = (warm[6] - repa[2]) / 4  # ERW at step 6 = REPA at step 2 + 4 warmup steps
    cost = warmup_step_cost(Size.from_json(size))
    assert warmup_step / full_step == pytest.approx(cost, rel=1e-9) and 0 < cost < 1
    assert f"a warmup step costs {cost:.2f}x the FLOPs of a phase-2 step" in done.stdout

    text = results.read_text()
    assert "the digits study" in text  # the base study's section is kept
    assert f"<!-- BEGIN convergence{suffix} -->" in text
    assert "(tiny size, --depth 4 --l2r-depth 2 --align-depth 3 --warmup 4 --budget-scale 2 --seeds 1)" in text
    assert "SiT with 4 blocks" in text and "budget 8 optimizer steps (2x the tiny size's), seeds 0." in text
    assert "projector after block 3" in text and "4 warmup steps of the budget train blocks 1-2" in text
    assert f"a warmup step (2 of 4 blocks at t = 0 plus the projector) costs {cost:.2f}x the FLOPs" in text
    assert "(0.16x at SiT-XL/2, 4 of 28 blocks)" in text  # the paper's regime, from the XL preset
    assert (tmp_path / f"convergence{suffix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_cost_counts_steps_evaluations_and_the_pool():
    from bench.study_cost import run_seconds, wall_seconds

    size = dataclasses.replace(SIZES["default"], seeds=(0, 1))
    t = {"plain": 1.0, "aligned": 2.0, "warmup": 0.5, "evaluation": 10.0}
    # 8 evaluations in 3200 steps; ERW's 6 come after its 800 warmup steps at the warmup step's price.
    one_seed = [3200 + 80, 6400 + 80, 800 * 0.5 + 2400 * 2 + 60]
    assert run_seconds(size, t) == one_seed * 2
    assert wall_seconds([5, 3, 4], jobs=2) == 7  # the third run waits for the first process to be free
    assert wall_seconds([5, 3, 4], jobs=1) == 12 and wall_seconds([5, 3, 4], jobs=3) == 5
