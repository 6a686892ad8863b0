"""Publish the new model only when it beats the published one (by FID, on the registry file)."""
from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    checkpoint: Input[Model],
    evaluation: Input[Artifact],
    workspace: str,
    registry: str,
    run_id: str,
    summary: Output[Markdown],
) -> bool:
    from erw import storage
    from erw.promote import promote_if_better

    decision = promote_if_better(
        checkpoint=checkpoint.uri,
        metrics_uri=evaluation.metadata["metrics"],
        registry_uri=registry or storage.join(workspace, "registry.json"),
        run_id=run_id,
    )
    print(decision.message, flush=True)
    with open(summary.path, "w") as f:
        f.write(decision.markdown())
    return decision.promoted
