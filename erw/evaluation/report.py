"""Human-readable summaries of an evaluation: Markdown and a self-contained HTML page (KFP shows both)."""

from __future__ import annotations

import base64
import html
from typing import Any

METRIC_LABELS = {  # key in metrics.json -> (label, direction)
    "fid": ("FID", "lower is better"),
    "sfid": ("sFID", "lower is better"),
    "inception_score": ("Inception Score", "higher is better"),
    "class_accuracy": ("Class accuracy", "share classified as the class asked for; higher is better"),
    "precision": ("Precision", "higher is better"),
    "recall": ("Recall", "higher is better"),
}


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for key, (label, direction) in METRIC_LABELS.items():
        value = result.get(key)
        rows.append((label, "n/a" if value is None else f"{value:.4g}", direction))
    return rows


def _details(result: dict[str, Any]) -> list[tuple[str, str]]:
    lines = [
        ("Samples", f"{result['num_samples']} from {result['samples']}"),
        ("Reference", f"{result['reference']} ({result['num_reference'] or 'published statistics, no'} images)"),
        ("Feature network", result["feature_network"]),
    ]
    sampling = result.get("sampling")
    if sampling:
        lines.append(("Checkpoint", f"{sampling.get('checkpoint', '?')} (step {sampling.get('step', '?')})"))
        settings = sampling.get("settings", {})
        lines.append(("Sampler", ", ".join(f"{k}={v}" for k, v in settings.items())))
    if result.get("notes"):
        lines.append(("Notes", "; ".join(result["notes"])))
    return lines


def markdown(result: dict[str, Any], grid_name: str, grid_classes: list[str]) -> str:
    out = ["# Sample quality", "", "| Metric | Value | |", "|---|---|---|"]
    out += [f"| {label} | {value} | {direction} |" for label, value, direction in _rows(result)]
    out += [""] + [f"- **{name}:** {text}" for name, text in _details(result)]
    out += ["", f"![samples, one row per class: {', '.join(grid_classes)}]({grid_name})", ""]
    return "\n".join(out)


def html_page(result: dict[str, Any], grid_png: bytes, grid_classes: list[str]) -> str:
    esc = html.escape
    metric_rows = "".join(
        f"<tr><td>{esc(label)}</td><td><b>{esc(value)}</b></td><td>{esc(direction)}</td></tr>"
        for label, value, direction in _rows(result)
    )
    details = "".join(f"<li><b>{esc(name)}:</b> {esc(str(text))}</li>" for name, text in _details(result))
    image = base64.b64encode(grid_png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Sample quality</title>"
        "<style>body{font-family:sans-serif}td{padding:2px 12px}</style></head><body>"
        f"<h2>Sample quality</h2><table>{metric_rows}</table><ul>{details}</ul>"
        f"<p>One row per class: {esc(', '.join(grid_classes))}</p>"
        f"<img src='data:image/png;base64,{image}' style='image-rendering:pixelated;max-width:100%'>"
        "</body></html>"
    )
