"""Sample from the trained model and score the samples (FID, sFID, IS, precision, recall).

The scores become KFP metrics; the sample grid becomes an HTML artifact the KFP UI shows
inline; `evaluation` is the folder holding metrics.json, the grid and the samples.
"""
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components import IMAGE
from components.common import run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw])
def evaluate(
    checkpoint: Input[Model],
    config: str,
    overrides: List[str],
    workspace: str,
    run_id: str,
    metrics: Output[Metrics],
    grid: Output[HTML],
    evaluation: Output[Artifact],
):
    import base64
    import json
    import math

    from erw.config import load_config
    from erw.data import storage

    cfg = load_config(config, overrides)
    s = cfg.sample
    out = storage.join(workspace, "eval", run_id)
    samples = storage.join(out, "samples")
    run_erw([
        "sample", "--ckpt", checkpoint.uri, "--out", samples, "--num-samples", s.num_samples,
        "--cfg-scale", s.cfg_scale, "--mode", s.mode, "--steps", s.steps,
    ])
    run_erw(["evaluate", "--samples", samples, "--reference", cfg.eval.reference, "--out", out])

    scores = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    for name, value in sorted(scores.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(name, value)
    grid_uri = next(u for u in (storage.join(out, "grid.png"), storage.join(samples, "grid.png")) if storage.exists(u))
    picture = base64.b64encode(storage.read_bytes(grid_uri)).decode()
    caption = ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.metadata.items()))
    with open(grid.path, "w") as f:
        f.write(
            f"<html><body><p>{checkpoint.uri} (step {checkpoint.metadata.get('step', '?')}): {caption}</p>"
            f'<img src="data:image/png;base64,{picture}" style="max-width:100%"/></body></html>'
        )
    evaluation.uri = out
    evaluation.metadata.update({"metrics": storage.join(out, "metrics.json"), "grid": grid_uri, "samples": samples})
