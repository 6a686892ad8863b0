"""One precompute worker: encode its share of the source into latent shards (GPU when present)."""
from typing import List

from kfp import dsl

from components import IMAGE
from components.common import run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw])
def precompute(work: dict, config: str, overrides: List[str], source: str) -> str:
    """Returns the dataset location, so the merge step can collect it from every worker. The work
    item's `refresh` is only part of the cache key: the plan step sets it when the latents are gone."""
    from erw import storage
    from erw.config import load_config

    if storage.exists(storage.join(work["dataset"], "manifest.json")):  # merged: complete, nothing to encode
        return work["dataset"]

    cfg = load_config(config, overrides)
    d = cfg.data
    argv = [
        "precompute", "--source", source, "--out", work["dataset"], "--cache", work["cache"],
        "--resolution", d.resolution, "--codec", d.codec,
        "--worker-index", int(work["worker_index"]), "--num-workers", int(work["num_workers"]),
    ]
    if d.codec_weights:
        argv += ["--codec-weights", d.codec_weights]
    if cfg.metrics.pushgateway:  # overrides=[metrics.pushgateway=HOST:PORT]: the dashboard's batch-step row
        argv += ["--pushgateway", cfg.metrics.pushgateway]
    run_erw(argv)
    return work["dataset"]
