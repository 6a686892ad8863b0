"""ERW phase 2: full SiT training from the warmup checkpoint, as a multi-node torchrun job.

Writes to <workspace>/train/<run id>: a retried step resumes from its last checkpoint.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Model, Output

from components import IMAGE
from components.common import launch_spec, publish_checkpoint, run_erw, run_training_job


@dsl.component(
    base_image=IMAGE,
    install_kfp_package=False,
    additional_funcs=[run_erw, publish_checkpoint, launch_spec, run_training_job],
)
def train(
    dataset: str,
    warmup: str,
    config: str,
    overrides: List[str],
    workspace: str,
    launch: dict,
    nodes: int,
    image: str,
    s3_secret: str,
    node_selector: dict,
    tolerations: list,
    run_id: str,
    start_from: str,
    continue_steps: int,
    checkpoint: Output[Model],
) -> str:
    """Returns the final checkpoint's URI; `checkpoint` is a small JSON pointer to it. start_from
    (continue mode, from the plan step): `warmup` is that published phase-2 checkpoint, and the run
    trains continue_steps steps from it."""
    from erw import storage

    # Before any GPU is asked for: the cached steps' results must still exist (see the plan step).
    for what, uri in (
        ("latents", storage.join(dataset, "manifest.json")),
        ("warmup", storage.join(warmup, "meta.json")),
    ):
        if not storage.exists(uri):
            raise SystemExit(
                f"the {what} this run was given no longer exist ({uri} is missing), although an earlier step "
                "reported them: they were deleted after the plan step checked. Rerun the pipeline; its plan step "
                "rebuilds what is missing."
            )
    spec = launch_spec(launch, "train", nodes, image, s3_secret, node_selector, tolerations, run_id)
    out = storage.join(workspace, "train", run_id)
    erw_args = [
        "train",
        "--config",
        config,
        *overrides,
        *([f"train.steps={continue_steps}"] if start_from else []),
        f"data.shards={dataset}",
        f"train.out={out}",
        f"metrics.port={spec.get('metrics_port', 0)}",
        "--init-from",
        warmup,
        "--resume",
        "auto",
    ]
    return run_training_job(spec, erw_args, out, checkpoint)
