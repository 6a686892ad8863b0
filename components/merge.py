"""Merge the precompute workers' shards: write manifest.json, which makes the dataset complete.

The dataset stays where the workers wrote it; later steps get its location as a string. The
`manifest` artifact is a copy of manifest.json (kilobytes) for lineage and the UI.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE
from components.common import run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw])
def merge(parts: List[str], refresh: str, manifest: Output[Dataset]) -> str:
    """`parts` holds every worker's dataset location (all equal): the fan-in of the precompute loop.
    Returns that location. `refresh`: only part of the cache key (see the plan step)."""
    import json

    from erw import storage

    uri = parts[0]
    if any(p != uri for p in parts):
        raise ValueError(f"precompute workers wrote to different locations: {sorted(set(parts))}")
    run_erw(["precompute", "--merge", "--num-workers", len(parts), f"data.shards={uri}"])
    data = storage.read_bytes(storage.join(uri, "manifest.json"))
    with open(manifest.path, "wb") as f:
        f.write(data)
    content = json.loads(data)
    manifest.metadata.update(
        {
            "uri": uri,
            "num_samples": content["num_samples"],
            "num_classes": content["num_classes"],
            "resolution": content["resolution"],
            "shards": len(content["shards"]),
            "failed_images": content["failures"]["count"],
        }
    )
    return uri
