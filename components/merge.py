"""Merge the precompute workers' shards: write manifest.json, which makes the dataset complete."""
from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE
from components.common import run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw])
def merge(parts: List[str], dataset: Output[Dataset]):
    """`parts` holds every worker's dataset location (all equal): the fan-in of the precompute loop."""
    import json

    from erw import storage

    uri = parts[0]
    if any(p != uri for p in parts):
        raise ValueError(f"precompute workers wrote to different locations: {sorted(set(parts))}")
    run_erw(["precompute", "--merge", "--out", uri, "--num-workers", len(parts)])
    manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    dataset.uri = uri  # the artifact is the S3 prefix itself: nothing is copied
    dataset.metadata.update({
        "num_samples": manifest["num_samples"],
        "num_classes": manifest["num_classes"],
        "resolution": manifest["resolution"],
        "shards": len(manifest["shards"]),
        "failed_images": manifest["failures"]["count"],
    })
