"""Sample from the trained model and score the samples (FID, sFID, IS, precision, recall).

The scores become KFP metrics and the report with the sample grid an HTML artifact the KFP UI
shows inline. The samples, grid.png and metrics.json stay in <workspace>/eval/<run id>, whose
location is returned (a string: as an artifact the folder would be copied into every consumer).
`evaluation` is a copy of metrics.json (bytes) with the locations in its metadata.
Without a configured reference (eval.reference) the samples are compared with the training data.
"""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Output

from components import IMAGE
from components.common import run_erw


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[run_erw])
def evaluate(
    checkpoint: str,
    dataset: str,
    config: str,
    overrides: List[str],
    workspace: str,
    run_id: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
) -> str:
    import json
    import math

    from erw.config import load_config
    from erw import storage

    cfg = load_config(config, overrides)
    out = storage.join(workspace, "eval", run_id)
    samples = storage.join(out, "samples")
    run_erw(["sample", "--ckpt", checkpoint, "--out", samples])  # sampler settings: the checkpoint's sample.*
    argv = [
        "evaluate",
        "--samples",
        samples,
        "--reference",
        cfg.eval.reference or dataset,
        "--out",
        out,
        "--run-id",
        run_id,
        "--pushgateway",
        cfg.metrics.pushgateway,
    ]
    if cfg.eval.inception_weights:
        argv += ["--inception-weights", cfg.eval.inception_weights]
    if cfg.eval.feature_network:
        argv += ["--feature-network", cfg.eval.feature_network]
    run_erw(argv)

    raw = storage.read_bytes(storage.join(out, "metrics.json"))
    scores = json.loads(raw)
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
        value = scores.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(name, value)
    with open(report.path, "wb") as f:
        f.write(storage.read_bytes(storage.join(out, "summary.html")))  # self-contained: the grid is inlined
    with open(evaluation.path, "wb") as f:
        f.write(raw)
    evaluation.metadata.update(
        {
            "uri": out,
            "metrics": storage.join(out, "metrics.json"),
            "grid": storage.join(out, "grid.png"),
            "samples": samples,
            "checkpoint": checkpoint,
        }
    )
    return out
