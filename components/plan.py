"""Plan the run: validate the config for both phases, fingerprint the source, cut the fan-out, and
check that what the cached steps point at still exists.

Runs first, on a CPU, never cached: listing the source is how a scheduled run notices new
data. The latents' unit store is derived from the encoding settings and the dataset from the
source's listing, so unchanged inputs map to the same dataset and the precompute steps are served
from cache, while a changed source encodes only its new and changed units (erw.data.precompute).

KFP cache entries never expire: a cached merge or warmup can point at latents or a checkpoint
deleted since (by hand, by a retention policy). Plan looks, and hands those steps a `refresh`
token that is part of their cache key. When the manifest or the finished warmup checkpoint is
missing, the token is this run's id, so the steps run and rebuild what is gone; the token is kept
in <workspace>/kfp-cache-tokens/, and while the result exists later runs get the same token
back, so the cache serves them again from the very next run.
"""

from typing import List, NamedTuple

from kfp import dsl

from components import IMAGE
from components.common import finished_checkpoint, warmup_location


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[warmup_location, finished_checkpoint])
def plan(
    config: str,
    overrides: List[str],
    source: str,
    workspace: str,
    precompute_workers: int,
    warmup_nodes: int,
    train_nodes: int,
    launch: dict,
    run_id: str,
    retrain_mode: str,
    registry: str,
) -> NamedTuple(
    "Plan", [("Output", List[dict]), ("refresh_latents", str), ("refresh_warmup", str), ("start_from", str)]
):
    """Output: one work item per precompute worker {"dataset", "cache", "worker_index", "num_workers", "refresh"} (named
    Output because kfp.local resolves ParallelFor items only from an output of that name:
    kfp/local/orchestrator/enhanced_dag_orchestrator.py, _run_parallel_for_task);
    refresh_latents / refresh_warmup: the cache-key token of those steps (a new one, this run's id,
    when their results are gone: they must run); start_from: continue mode's published checkpoint
    ("" in scratch mode)."""
    import hashlib
    from collections import namedtuple

    from erw.config import load_config, validate
    from erw import storage
    from erw.data.precompute import PrecomputeJob, plan_in_workspace

    cfg = load_config(config, [*overrides, f"data.source={source}"])
    procs_per_node = int(launch.get("procs_per_node", 1))  # a Struct number: 8.0
    validate(cfg, warmup_nodes * procs_per_node, "warmup")
    validate(cfg, train_nodes * procs_per_node, "train")
    # Names, sizes and ETags only, no image read: which units of the source are already encoded.
    encoding = plan_in_workspace(workspace, PrecomputeJob.from_config(cfg))
    dataset = encoding.dataset
    print(f"source {source}: {encoding.summary()}; the dataset is {dataset}", flush=True)

    latents_ok = storage.exists(storage.join(dataset, "manifest.json"))
    warmup_dir = warmup_location(config, overrides, dataset, workspace)
    warmup_ok = bool(finished_checkpoint(warmup_dir, cfg.warmup.steps))
    for name, ok, where in (("latents", latents_ok, dataset), ("warmup", warmup_ok, warmup_dir)):
        print(
            f"{name}: {'present, a cached result may be used' if ok else 'missing: will be (re)built'} ({where})",
            flush=True,
        )

    def refresh_token(location: str, present: bool) -> str:
        kept = storage.join(workspace, "kfp-cache-tokens", hashlib.sha256(location.encode()).hexdigest()[:16])
        if present:  # the token its build ran with: the same cache key ("" for results older than tokens)
            return storage.read_bytes(kept).decode() if storage.exists(kept) else ""
        storage.write_bytes(kept, run_id.encode())
        return run_id

    refresh_latents, refresh_warmup = refresh_token(dataset, latents_ok), refresh_token(warmup_dir, warmup_ok)
    n = precompute_workers
    # The token rides in each work item: the item is the precompute step's cache key.
    work = [
        {"dataset": dataset, "cache": encoding.cache, "worker_index": i, "num_workers": n, "refresh": refresh_latents}
        for i in range(n)
    ]
    # Continue mode: phase 2 starts from the published model (the warmup step then only passes it on).
    start_from = ""
    if retrain_mode == "continue":
        from erw.registry import open_registry

        published = open_registry(registry or storage.join(workspace, "registry.json")).published()
        if published is None:
            print("retrain_mode=continue but nothing is published yet: this run trains from scratch", flush=True)
        else:
            start_from = published["checkpoint"]
            if not storage.exists(storage.join(start_from, "meta.json")):
                raise SystemExit(
                    f"the published model {start_from} is missing: restore it, or run retrain_mode=scratch"
                )
            print(f"continue mode: phase 2 starts from the published model {start_from}", flush=True)
    out = namedtuple("Plan", ["Output", "refresh_latents", "refresh_warmup", "start_from"])
    return out(work, refresh_latents, refresh_warmup, start_from)
