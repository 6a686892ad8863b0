"""Plan the run: validate the config for both phases, fingerprint the source, cut the fan-out.

Runs first, on a CPU, never cached: listing the source is how a scheduled run notices new
data. The latents' location is derived from the source's listing and the encoding settings,
so unchanged inputs map to the same location and the precompute steps are served from cache.
"""
from typing import List

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan(
    config: str,
    overrides: List[str],
    source: str,
    workspace: str,
    precompute_workers: int,
    warmup_nodes: int,
    train_nodes: int,
    procs_per_node: int,
) -> List[dict]:
    """One work item per precompute worker: {"dataset", "worker_index", "num_workers"}."""
    import hashlib
    import json

    from erw.config import load_config, validate
    from erw import storage
    from erw.data.sources import open_source

    cfg = load_config(config, [*overrides, f"data.source={source}"])
    validate(cfg, warmup_nodes * procs_per_node, "warmup")
    validate(cfg, train_nodes * procs_per_node, "train")
    listing = open_source(source, shard_size=1000).listing_sha256  # names and sizes; reads no image
    d = cfg.data
    key = hashlib.sha256(json.dumps([listing, d.resolution, d.codec, d.codec_weights]).encode()).hexdigest()
    dataset = storage.join(workspace, "latents", f"{d.codec}-{d.resolution}px-{key[:16]}")
    print(f"source {source}: listing {listing[:16]}; latents go to {dataset}", flush=True)
    n = precompute_workers
    return [{"dataset": dataset, "worker_index": i, "num_workers": n} for i in range(n)]
