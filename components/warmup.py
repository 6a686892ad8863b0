"""ERW phase 1: train the L2R blocks to reproduce the frozen encoder, as a torchrun job.

Cached: every full-training run with the same data and warmup settings reuses the checkpoint.
Its location is a hash of those settings, so a retried or re-executed step resumes it.
"""
from typing import List

from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE
from components.common import launch_argv, publish_checkpoint, run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw, launch_argv, publish_checkpoint])
def warmup(
    dataset: str,
    config: str,
    overrides: List[str],
    workspace: str,
    scheduler: str,
    image: str,
    nodes: int,
    procs_per_node: int,
    gpus_per_node: int,
    cpus_per_node: int,
    memory_gb_per_node: int,
    node_selector: dict,
    tolerations: list,
    s3_secret: str,
    queue: str,
    service_account: str,
    timeout: str,
    max_restarts: int,
    metrics_port: int,
    checkpoint: Output[Model],
) -> str:
    """Returns the final checkpoint's URI; `checkpoint` is a small JSON pointer to it."""
    import hashlib
    import json
    import os

    from erw.config import load_config
    from erw import storage

    overrides = [*overrides, f"data.shards={dataset}", f"metrics.port={metrics_port}"]
    cfg = load_config(config, overrides)
    # What the warmup's result depends on; not where it is written, nor phase 2's settings.
    sections = ("seed", "model", "encoder", "data", "objective", "warmup")
    settings = {k: v for k, v in cfg.to_dict().items() if k in sections}
    settings["warmup"] = {k: v for k, v in settings["warmup"].items() if k != "out"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = storage.join(workspace, "warmup", key)
    erw_args = ["warmup", "--config", config, *overrides, f"warmup.out={out}", "--resume", "auto"]
    run_erw(launch_argv(
        erw_args, scheduler, image, nodes, procs_per_node, gpus_per_node, cpus_per_node, memory_gb_per_node,
        node_selector, tolerations, s3_secret, queue, service_account, timeout, max_restarts, metrics_port,
        os.environ.get("ERW_RUN_ID", ""),
    ))
    return publish_checkpoint(out, "warmup", checkpoint)
