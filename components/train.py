"""ERW phase 2: full SiT training from the warmup checkpoint, as a multi-node torchrun job.

Writes to <workspace>/train/<run id>: a retried step resumes from its last checkpoint.
"""
from typing import List

from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE
from components.common import launch_argv, publish_checkpoint, run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw, launch_argv, publish_checkpoint])
def train(
    dataset: str,
    warmup: str,
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
    run_id: str,
    checkpoint: Output[Model],
) -> str:
    """Returns the final checkpoint's URI; `checkpoint` is a small JSON pointer to it."""
    from erw import storage

    out = storage.join(workspace, "train", run_id)
    erw_args = [
        "train", "--config", config, *overrides, f"data.shards={dataset}", f"train.out={out}",
        f"metrics.port={metrics_port}", "--init-from", warmup, "--resume", "auto",
    ]
    run_erw(launch_argv(
        erw_args, scheduler, image, nodes, procs_per_node, gpus_per_node, cpus_per_node, memory_gb_per_node,
        node_selector, tolerations, s3_secret, queue, service_account, timeout, max_restarts, metrics_port, run_id,
    ))
    return publish_checkpoint(out, "train", checkpoint)
