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

    if storage.exists(storage.join(work["dataset"], "manifest.json")):  # merged: complete, nothing to encode
        return work["dataset"]
    # The plan step chose the dataset and the unit store from the same config; overrides come last.
    run_erw(
        [
            "precompute",
            "--config",
            config,
            "--worker-index",
            int(work["worker_index"]),
            "--num-workers",
            int(work["num_workers"]),
            *overrides,
            f"data.source={source}",
            f"data.shards={work['dataset']}",
            f"precompute.cache={work['cache']}",
        ]
    )
    return work["dataset"]
