"""`erw gc`: the workspace's retention policy.

The pipeline's workspace holds

    train/RUN_ID/step-*/     checkpoints of each run         eval/RUN_ID/   its samples and metrics
    warmup/KEY/step-*/       ERW warmups (shared by runs)    latents/...    unit stores and datasets
    registry.json, kfp-cache-tokens/, ...                    never touched by gc

What is kept:
- the last --keep-runs finished runs (by their newest file), with checkpoints and evaluations;
- the published model's lineage, always: its run, its evaluation, the warmup it started from,
  its dataset, and (continue mode) the published models it was trained from, recursively;
- every run that wrote anything within --grace-hours: it may be running (not counted in N);
- the warmups and datasets that a kept run or the published lineage used (from each run's
  newest checkpoint's meta.json: data.shards and init_from), and the runs that kept runs
  continued from (continue mode); a run whose meta.json does not say which warmup it used
  keeps every warmup;
- in latents/: the kept datasets' manifests and the unit shards (+ done markers) they list,
  the units that an unfinished dataset (dataset.json, no manifest.json yet) lists, every
  settings claim (precompute.json), and every file younger than --grace-hours.
Everything else under train/, eval/, warmup/ and latents/ is deleted by --apply; --dry-run
prints exactly the files --apply would delete, one per line, with the reason.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erw import storage
from erw.data.shards import MANIFEST, resolve_uri
from erw.errors import ErwError

AREAS = ("train", "eval", "warmup", "latents")
DEFAULT_KEEP_RUNS = 3
DEFAULT_GRACE_HOURS = 24.0


class GcError(ErwError):
    """The retention policy cannot be applied safely; the message says why."""


@dataclass
class GcPlan:
    workspace: str
    delete: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason), sorted by uri
    kept_runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{uri}\t{reason}" for uri, reason in self.delete]


def plan_gc(
    workspace: str,
    registry: str = "",
    keep_runs: int = DEFAULT_KEEP_RUNS,
    grace_hours: float = DEFAULT_GRACE_HOURS,
    now: float | None = None,
) -> GcPlan:
    if keep_runs < 1:
        raise GcError(f"--keep-runs {keep_runs} must be at least 1")
    now = time.time() if now is None else now
    recent = now - grace_hours * 3600
    files = {area: storage.list_files(storage.join(workspace, area)) for area in AREAS}
    plan = GcPlan(workspace)

    # Runs: train/ID and eval/ID, grouped by ID.
    runs: dict[str, list[storage.FileInfo]] = defaultdict(list)
    for area in ("train", "eval"):
        for f in files[area]:
            runs[f.path.split("/", 1)[0]].append(f)
    newest = {run: max(f.modified for f in fs) for run, fs in runs.items()}
    active = {r for r in runs if newest[r] >= recent}  # may be running: kept, and not counted
    by_age = sorted(set(runs) - active, key=lambda r: newest[r], reverse=True)
    published = _published_lineage(workspace, registry)
    kept = set(by_age[:keep_runs]) | active
    kept |= {
        r for r in runs if any(_inside(storage.join(workspace, "train", r), uri) for uri in published["checkpoints"])
    }

    # What the kept runs used, from their newest checkpoint's meta.json; a run that a kept run
    # continued from (continue mode) is kept too, and so on up the chain.
    datasets, warmups, unknown_warmup = set(published["datasets"]), set(published["warmups"]), False
    todo, seen = sorted(kept), set()
    while todo:
        run = todo.pop()
        seen.add(run)
        meta = _newest_meta(
            storage.join(workspace, "train", run), [f for f in files["train"] if f.path.startswith(run + "/")]
        )
        if meta is None:
            continue  # no committed checkpoint yet: it uses nothing that is not also recent, or nothing at all
        shards = meta.get("config", {}).get("data", {}).get("shards")
        if shards:
            datasets.add(shards.rstrip("/"))
        if "init_from" not in meta:
            unknown_warmup = True
        elif meta["init_from"]:
            warmups.add(meta["init_from"])
            parents = {r for r in runs if _inside(storage.join(workspace, "train", r), meta["init_from"])}
            kept |= parents
            todo += sorted(parents - seen - set(todo))
    plan.kept_runs = sorted(kept, key=lambda r: newest[r], reverse=True)
    if unknown_warmup:
        plan.notes.append("a kept run's checkpoint does not record its warmup (init_from): every warmup is kept")

    for run in sorted(set(runs) - kept):
        for area in ("train", "eval"):
            for f in files[area]:
                if f.path.split("/", 1)[0] == run:
                    plan.delete.append((storage.join(workspace, area, f.path), f"run {run} is not among the kept runs"))

    # Warmups: warmup/KEY, kept when used, recent, or when usage is unknown.
    warm: dict[str, list[storage.FileInfo]] = defaultdict(list)
    for f in files["warmup"]:
        warm[f.path.split("/", 1)[0]].append(f)
    for key, fs in sorted(warm.items()):
        folder = storage.join(workspace, "warmup", key)
        used = any(_inside(folder, uri) for uri in warmups)
        if unknown_warmup or used or max(f.modified for f in fs) >= recent:
            continue
        plan.delete += [(storage.join(folder, f.path.split("/", 1)[1]), "warmup no kept run started from") for f in fs]

    plan.delete += _latents(workspace, files["latents"], datasets, recent)
    plan.delete.sort()
    return plan


def _latents(workspace: str, files: list[storage.FileInfo], datasets: set[str], recent: float) -> list[tuple[str, str]]:
    root = storage.join(workspace, "latents")
    uris = {storage.join(root, f.path): f for f in files}
    keep: set[str] = set()
    for uri, f in uris.items():
        name = posixpath.basename(f.path)
        folder = uri[: -len(name) - 1]
        if name == "precompute.json" or f.modified >= recent:
            keep.add(uri)
        elif name == MANIFEST and folder in datasets or name == "dataset.json" and folder in datasets:
            keep.add(uri)
    for dataset in datasets:
        if not _inside(root, dataset):
            continue
        manifest = _read_json(storage.join(dataset, MANIFEST))
        if manifest is None:
            continue
        keep |= {storage.join(dataset, MANIFEST), storage.join(dataset, "dataset.json")}
        for shard in manifest["shards"]:
            tar = resolve_uri(dataset, shard["name"])
            keep |= {tar, tar[: -len(".tar")] + ".json"}
    # An unfinished dataset (no manifest yet): its units are being encoded right now.
    for uri in uris:
        if uri.endswith("/dataset.json") and uri[: -len("/dataset.json")] + "/" + MANIFEST not in uris:
            info = _read_json(uri) or {}
            folder = uri[: -len("/dataset.json")]
            store = storage.join(resolve_uri(folder, info.get("cache", ".")), "units")
            keep.add(uri)
            keep |= {storage.join(store, f"{key}.{ext}") for key in info.get("units", []) for ext in ("tar", "json")}
    return [(uri, "latents no kept manifest lists") for uri in sorted(uris) if uri not in keep]


def _published_lineage(workspace: str, registry: str) -> dict[str, set[str]]:
    """Checkpoints, datasets and warmups of the published model and the models it started from."""
    from erw.registry import open_registry

    found: dict[str, set[str]] = {"checkpoints": set(), "datasets": set(), "warmups": set()}
    uri = registry or storage.join(workspace, "registry.json")
    if not uri.startswith("mlflow:") and not storage.exists(uri):
        return found
    reg = open_registry(uri)
    entries = {e["checkpoint"]: e for e in reg.entries()}
    entry = reg.published()
    while entry is not None and entry["checkpoint"] not in found["checkpoints"]:
        found["checkpoints"].add(entry["checkpoint"])
        lineage = entry.get("lineage") or {}
        meta = _read_json(storage.join(entry["checkpoint"], "meta.json")) or {}
        dataset = lineage.get("dataset") or meta.get("config", {}).get("data", {}).get("shards")
        if dataset:
            found["datasets"].add(dataset.rstrip("/"))
        started = lineage.get("started_from") or meta.get("init_from")
        if started:
            found["warmups"].add(started)  # a warmup, or (continue mode) a published checkpoint
            found["checkpoints"].add(started)
        for key in ("samples", "metrics_uri"):
            value = lineage.get(key) or entry.get(key)
            if value:
                found["checkpoints"].add(value)  # kept through the run folder that holds it
        entry = entries.get(started) if started else None
    return found


def _newest_meta(run_dir: str, files: list[storage.FileInfo]) -> dict[str, Any] | None:
    metas = sorted(f.path for f in files if f.path.endswith("/meta.json") and "/step-" in f.path)
    if not metas:
        return None
    return _read_json(storage.join(run_dir, metas[-1].split("/", 1)[1]))


def _inside(folder: str, uri: str) -> bool:
    folder, uri = folder.rstrip("/"), uri.rstrip("/")
    return uri == folder or uri.startswith(folder + "/")


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (storage.ObjectNotFound, ValueError):
        return None


def apply_gc(plan: GcPlan) -> int:
    for uri, _ in plan.delete:
        storage.delete(uri)
    if not storage.is_s3(plan.workspace):  # local folders left empty go too (S3 has none)
        root = Path(plan.workspace).resolve()
        for folder in sorted({Path(uri).resolve().parent for uri, _ in plan.delete}, key=lambda p: -len(p.parts)):
            while folder != root and root in folder.parents and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
    return len(plan.delete)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gc",
        help="delete old runs, warmups and latents of a workspace (keeps the published model's lineage)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workspace", required=True, help="the pipeline's workspace, local or s3://")
    p.add_argument("--registry", default="", help="the registry (default WORKSPACE/registry.json; or mlflow:NAME)")
    p.add_argument("--keep-runs", type=int, default=DEFAULT_KEEP_RUNS, help=f"runs kept (default {DEFAULT_KEEP_RUNS})")
    p.add_argument(
        "--grace-hours",
        type=float,
        default=DEFAULT_GRACE_HOURS,
        help=f"never delete what changed this recently: it may be in use (default {DEFAULT_GRACE_HOURS:g})",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print what --apply would delete")
    mode.add_argument("--apply", action="store_true", help="delete it")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    plan = plan_gc(args.workspace, args.registry, args.keep_runs, args.grace_hours)
    for line in plan.lines():
        print(line)
    for note in plan.notes:
        print(f"note: {note}")
    verb = "deleted" if args.apply else "would delete"
    if args.apply:
        apply_gc(plan)
    print(f"gc: {verb} {len(plan.delete)} files; kept runs: {', '.join(plan.kept_runs) or 'none'}")
    return 0
