"""When two evaluations measure the same thing: the settings recorded in `metrics.json` (by
`erw evaluate`) that must agree before their metrics may be compared, and which way each metric
improves. The promotion gate (erw/promote.py) and the registries (erw/registry) read them here.
"""

from __future__ import annotations

from typing import Any

# Metrics a gate may use, and whether lower is better.
LOWER_IS_BETTER = {"fid": True, "sfid": True, "inception_score": False, "precision": False, "recall": False}
# What must agree between two evaluations for their metrics to be comparable: name -> getter.
SAMPLER_FIELDS = {
    "sampler mode": "mode",
    "ODE solver": "solver",
    "sampling steps": "steps",
    "CFG scale": "cfg_scale",
    "CFG interval start": "guidance_low",
    "CFG interval end": "guidance_high",
    "EMA weights": "use_ema",
    "sampled classes": "classes",
}


def evaluation_settings(metrics: dict[str, Any]) -> dict[str, Any]:
    """The settings an evaluation was made with, by the name the gate reports them under."""
    sampler = ((metrics.get("sampling") or {}).get("settings")) or {}
    return {
        "reference statistics": metrics.get("reference_sha256"),
        "number of samples": metrics.get("num_samples"),
        "evaluator network": metrics.get("feature_network"),
        **{name: sampler.get(key) for name, key in SAMPLER_FIELDS.items()},
    }


def comparison_problems(candidate: dict[str, Any], published: dict[str, Any]) -> list[str]:
    mine, theirs = evaluation_settings(candidate), evaluation_settings(published)
    problems = []
    for name in mine:
        if mine[name] is None or theirs[name] is None:
            which = "candidate's" if mine[name] is None else "published model's"
            problems.append(f"{name}: not recorded in the {which} metrics.json (evaluate it again with this erw)")
        elif mine[name] != theirs[name]:
            problems.append(
                f"{name}: {_short(mine[name])} for the candidate, {_short(theirs[name])} for the published model"
            )
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
