"""ERW phase 1: train the L2R blocks to reproduce the frozen encoder, as a torchrun job.

Cached: every full-training run with the same data and warmup settings reuses the checkpoint.
Its location is a hash of those settings, so a retried or re-executed step resumes it.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE
from components.common import (
    finished_checkpoint,
    launch_spec,
    publish_checkpoint,
    run_erw,
    run_training_job,
    warmup_location,
)


@dsl.component(
    base_image=IMAGE,
    install_kfp_package=False,
    additional_funcs=[run_erw, publish_checkpoint, launch_spec, run_training_job, warmup_location, finished_checkpoint],
)
def warmup(
    dataset: str,
    config: str,
    overrides: List[str],
    workspace: str,
    launch: dict,
    nodes: int,
    image: str,
    s3_secret: str,
    node_selector: dict,
    tolerations: list,
    refresh: str,
    start_from: str,
    checkpoint: Output[Model],
) -> str:
    """Returns the final checkpoint's URI; `checkpoint` is a small JSON pointer to it. `refresh` is
    only part of the cache key: the plan step sets it when the cached checkpoint is gone.
    `start_from` (continue mode): returned as is, nothing is trained."""
    import os

    from erw.config import load_config

    if start_from:  # continue mode (see the plan step): no warmup, phase 2 starts from this checkpoint
        print(f"continue mode: no warmup, phase 2 starts from {start_from}", flush=True)
        return publish_checkpoint(start_from, "train", checkpoint)

    # The run id comes from the pod's label, not an input: as an input it would change the cache key.
    spec = launch_spec(
        launch, "warmup", nodes, image, s3_secret, node_selector, tolerations, os.environ.get("ERW_RUN_ID", "")
    )
    overrides = [*overrides, f"data.shards={dataset}", f"metrics.port={spec.get('metrics_port', 0)}"]
    out = warmup_location(config, overrides, dataset, workspace)
    done = finished_checkpoint(out, load_config(config, overrides).warmup.steps)
    if done:  # re-executed (a refresh, a retry after the job finished): nothing to train
        print(f"warmup already finished at {done}", flush=True)
        return publish_checkpoint(out, "warmup", checkpoint)
    erw_args = ["warmup", "--config", config, *overrides, f"warmup.out={out}", "--resume", "auto"]
    return run_training_job(spec, erw_args, out, checkpoint)
