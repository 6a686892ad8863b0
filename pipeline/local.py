"""Run the whole DAG on this machine: kfp.local runs every component as a subprocess of this
Python environment, and the training steps start torchrun through TorchX's `local_cwd`.

Outputs go to a local directory, or to S3 when `workspace` is s3://... (with AWS_ENDPOINT_URL
pointing at a local endpoint such as MinIO). Task results are cached under the workspace, so
a second run reuses the latents and the warmup checkpoint, as a cluster run would.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.console import CACHE_HIT, log_file, step_console
from pipeline.params import DEMO, DEMO_EVALUATOR, DEMO_INPUTS, REPO, defaults, resolve


@dataclass
class LocalRun:
    seconds: float
    outputs: dict[str, Any]
    cached: list[str] = field(default_factory=list)  # tasks served from the cache
    log: str = ""  # the steps' full output

    def scores(self) -> dict[str, Any]:
        """metrics.json of the evaluation (local or s3://)."""
        from erw import storage

        return json.loads(storage.read_bytes(self.outputs["evaluation"].metadata["metrics"]))

    def summary(self) -> str:
        model, evaluation = self.outputs["model"], self.outputs["evaluation"]
        scores = self.scores()
        shown = [f"FID {scores['fid']:.2f}"]
        if scores.get("class_accuracy") is not None:
            shown.append(
                f"class accuracy {100 * scores['class_accuracy']:.1f}% (samples the evaluator "
                "classifies as the class asked for)"
            )
        shown += [
            f"{k} {scores[k]:.3g}" for k in ("inception_score", "precision", "recall") if scores.get(k) is not None
        ]
        verdict = Path(self.outputs["promotion"].path).read_text().splitlines()[0].lstrip("# ")
        lines = [
            f"pipeline finished in {self.seconds / 60:.1f} min",
            f"  scores       {', '.join(shown)}",
            f"  checkpoint   {model.metadata['uri']}  (step {int(model.metadata['step'])})",
            f"  metrics      {evaluation.metadata['metrics']}",
            f"  sample grid  {evaluation.metadata['grid']}  (report: {self.outputs['report'].path})",
            f"  promotion    {verdict}: {self.outputs['promotion'].path}",
            f"  from cache   {', '.join(self.cached) if self.cached else 'nothing (first run, or --no-cache)'}",
            f"  full log     {self.log}",
        ]
        return "\n".join(lines)


def local_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The demo preset, updated with `arguments`, validated; local paths made absolute."""
    base = {**defaults(), **DEMO}
    if arguments.get("config", DEMO["config"]) != DEMO["config"] and "source" not in arguments:
        base["source"] = _config_source(arguments["config"], arguments.get("overrides", []))
    args = resolve(arguments, base=base)
    for name in ("config", "source", "workspace", "registry"):
        if args[name] and "://" not in args[name]:
            path = Path(args[name])
            args[name] = str(path if path.is_absolute() else REPO / path)
    return args


def run_local(
    arguments: dict[str, Any],
    use_cache: bool = True,
    local_dir: str | Path | None = None,
    verbose: bool = False,
    image: str | None = None,
) -> LocalRun:
    """Run the DAG; kfp.local keeps task outputs and its cache in `local_dir` (default: the
    workspace when it is local, else runs/kfp-local). The screen shows one line per step and the
    progress of training and sampling; the steps' full output goes to a log file under
    `local_dir`/logs (and to the screen too when `verbose`).

    image: run every step as a container of this image (pipeline/containers.py) instead of as a
    subprocess of this environment."""
    args = local_arguments(arguments)
    if local_dir is None:
        local_dir = args["workspace"] if "://" not in args["workspace"] else REPO / "runs" / "kfp-local"
    log = log_file(local_dir)
    with step_console(log, verbose):
        run = _run_dag(args, use_cache, local_dir, image)
    run.log = str(log)
    return run


def _run_dag(args: dict[str, Any], use_cache: bool, local_dir: str | Path, image: str | None = None) -> LocalRun:
    from kfp import local

    from pipeline.dag import erw_pipeline

    pipeline_root = Path(local_dir, "kfp-outputs")
    if args["config"] == str(REPO / DEMO["config"]):
        _make_demo_inputs()
    if image:
        from pipeline import containers

        demo = args["config"] == str(REPO / DEMO["config"])
        args, mounts = containers.container_arguments(args)
        if demo:  # the preset names its generated evaluator relative to the checkout
            evaluator = str(REPO / DEMO_EVALUATOR)
            args["overrides"] = [*args["overrides"], f"eval.feature_network={evaluator}"]
            mounts.append((evaluator, True))
        pipeline_root.mkdir(parents=True, exist_ok=True)
        pipeline_root.chmod(0o777)  # ours: the steps, as the image's user, write their outputs into it
        containers.check_writable_by_image([p for p, read_only in mounts if not read_only])
        runner, pipeline = containers.docker_runner(mounts), containers.image_pipeline(image)
    else:
        runner, pipeline = local.SubprocessRunner(use_venv=False), erw_pipeline  # this environment has erw and kfp
    local.init(
        runner=runner,
        pipeline_root=str(pipeline_root),
        enable_caching=use_cache,
        cache_root=str(Path(local_dir, "kfp-cache")),
        raise_on_error=True,
    )
    # kfp.local logs cache hits at INFO outside its own log setup: listen at INFO, and since any
    # handler on the root logger silences Python's last-resort one, print warnings ourselves.
    root, hits, problems = logging.getLogger(), _CacheHits(), logging.StreamHandler()
    problems.setLevel(logging.WARNING)
    level = root.level
    root.setLevel(min(level, logging.INFO))
    root.addHandler(hits)
    root.addHandler(problems)
    started = time.monotonic()
    try:
        with warnings.catch_warnings(), kfp_local_globals_restored():
            # Cluster-only settings (resources, display names, Kubernetes) are ignored here by design.
            warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect in the current local")
            warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom")
            task = pipeline(**args)
    finally:
        root.removeHandler(hits)
        root.removeHandler(problems)
        root.setLevel(level)
    return LocalRun(time.monotonic() - started, dict(task.outputs), sorted(hits.tasks))


@contextlib.contextmanager
def kfp_local_globals_restored() -> Iterator[None]:
    """Put back `builtins.print` and the root logger's handlers and level on the way out.

    kfp.local indents a task's output by swapping `builtins.print` for a wrapper, and gives each
    task a root-logger handler on the current sys.stdout, each time restoring what it saved
    (kfp/local/logging_utils.py `indented_print`, `local_logger_context`). The tasks of a
    ParallelFor run in threads, so two swaps can interleave: one saves the other's wrapper or
    handler and restores it last. Every later print then writes four spaces to stdout first (even a
    print to stderr), and every later log record goes to a stream that may be closed by then (this
    run's console)."""
    original_print = builtins.print
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = original_print
        root.handlers[:] = handlers
        root.setLevel(level)


def _make_demo_inputs() -> None:
    """Create the demo's generated inputs (the digits images, ...) that do not exist yet."""
    from erw.cli import main

    for path, argv in DEMO_INPUTS.items():
        if not (REPO / path).exists():
            argv = [str(REPO / a) if a in DEMO_INPUTS else a for a in argv]  # any working directory
            print(f"creating {path}: erw {' '.join(argv)}", flush=True)
            if main(argv):
                raise SystemExit(f"erw {argv[0]} failed while creating the demo input {path}; see above")


def _config_source(config: str, overrides: list[str]) -> str:
    from erw.config import load_config

    path = Path(config)
    return load_config(path if path.is_absolute() else REPO / path, overrides).data.source


class _CacheHits(logging.Handler):
    """kfp.local logs one line per task served from its cache; collect their names."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.tasks: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        match = CACHE_HIT.search(record.getMessage())
        if match:
            self.tasks.add(match.group(1))
