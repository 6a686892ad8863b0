"""Publish the new model only when it beats the published one (by FID, on the registry file)."""

from typing import List

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    checkpoint: str,
    evaluation: str,
    config: str,
    overrides: List[str],
    workspace: str,
    registry: str,
    run_id: str,
    summary: Output[Markdown],
) -> bool:
    """`checkpoint`: the trained checkpoint's URI; `evaluation`: the folder holding its metrics.json.
    The margin is the config's promote.margin. With overrides=[metrics.pushgateway=HOST:PORT] the
    decision is pushed there (the dashboard's promote row)."""
    from erw import storage
    from erw.config import load_config
    from erw.promote import promote_if_better, push_decision

    cfg = load_config(config, overrides)  # a bad config fails before the registry changes
    decision = promote_if_better(
        checkpoint=checkpoint,
        metrics_uri=storage.join(evaluation, "metrics.json"),
        registry_uri=registry or storage.join(workspace, "registry.json"),
        run_id=run_id,
        margin=cfg.promote.margin,
    )
    print(decision.message, flush=True)
    push_decision(cfg.metrics.pushgateway, run_id, decision)
    with open(summary.path, "w") as f:
        f.write(decision.markdown())
    return decision.promoted
