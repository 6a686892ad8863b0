"""`erw evaluate`: samples + reference -> metrics.json, grid.png, summary.md and summary.html.

Everything that can be checked cheaply (the samples exist, the reference has the right shape,
the networks load) is checked before the feature pass over the samples.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from erw import storage
from erw.data.shards import MANIFEST
from erw.evaluation import report
from erw.evaluation.features import FeatureNetwork, Features, extract_features, load_network
from erw.evaluation.grid import GridCollector
from erw.data.image_sets import ImageSetError, open_image_set
from erw.evaluation.metrics import Gaussian, frechet_distance, inception_score, precision_recall
from erw.evaluation.reference import Reference, ReferenceError, load_reference

IS_SPLITS = 10
PR_NEIGHBOURS = 3


@dataclass
class EvalOptions:
    samples: str
    reference: str
    out: str
    inception_weights: str = ""
    feature_network: str = ""
    batch_size: int = 64
    device: str = "auto"
    num_samples: int | None = None  # None = all
    reference_limit: int = 50_000
    reference_cache: str = ""
    grid_rows: int = 10  # all of a 10-class dataset (the digits)
    grid_per_class: int = 8


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Run the evaluation and write its outputs under opts.out; returns the metrics.json content."""
    started = time.time()
    device = resolve_device(opts.device)
    if not opts.samples.endswith(".npz") and not storage.exists(storage.join(opts.samples, MANIFEST)):
        raise ImageSetError(
            f"samples {opts.samples} has no {MANIFEST}: give the --out of a finished `erw sample` (rerun it to "
            "finish an interrupted one) or an .npz with arr_0 images"
        )
    try:
        samples = open_image_set(opts.samples)
    except ImageSetError as err:
        raise ImageSetError(f"samples: {err}") from None
    network = load_network(opts.inception_weights, opts.feature_network, device)
    reference = load_reference(
        opts.reference,
        network,
        resolution=samples.resolution,
        batch_size=opts.batch_size,
        device=device,
        limit=opts.reference_limit,
        cache=opts.reference_cache,
    )

    grid = GridCollector(opts.grid_rows, opts.grid_per_class)
    sample_labels: list[torch.Tensor] = []

    def sample_batches():
        for images, labels in samples.batches(opts.batch_size, opts.num_samples):
            grid.add(images, labels)
            sample_labels.append(labels)
            yield images

    features = extract_features(network, sample_batches(), device)
    result = compute_metrics(features, reference, network, device, torch.cat(sample_labels).numpy())
    result |= {
        "samples": opts.samples,
        "reference": opts.reference,
        "seconds": round(time.time() - started, 1),
        "reference_sha256": statistics_sha256(reference),
        "sampling": _sampling_info(samples.manifest),
    }
    write_outputs(opts.out, result, grid, samples.manifest)
    return result


def compute_metrics(
    features: Features,
    reference: Reference,
    network: FeatureNetwork,
    device: torch.device,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """labels: the class each sample was generated for (-1: unknown), for the class accuracy."""
    n, dim = features.pool.shape
    if dim != reference.pool.mu.shape[0]:
        raise ReferenceError(
            f"the samples' features are {dim}-d but the reference statistics are {reference.pool.mu.shape[0]}-d: "
            "the reference was computed with another feature network"
        )
    if n < 2:
        raise ImageSetError(f"{n} sample(s): the metrics need at least 2")
    notes = []
    if n < dim:
        notes.append(
            f"{n} samples for {dim}-d features: FID is biased upwards, compare only runs with equal sample counts"
        )
    result: dict[str, Any] = {"fid": frechet_distance(Gaussian.fit(features.pool), reference.pool)}
    result["sfid"] = None
    if features.spatial is not None and reference.spatial is not None:
        result["sfid"] = frechet_distance(Gaussian.fit(features.spatial), reference.spatial)
    elif network.has_spatial:
        notes.append("no sFID: the reference has no spatial statistics")
    result["inception_score"] = None
    if features.logits is not None:
        splits = min(IS_SPLITS, n)
        if splits < IS_SPLITS:
            notes.append(f"Inception Score over {splits} splits (fewer samples than {IS_SPLITS})")
        result["inception_score"] = inception_score(features.logits, splits)
    result["class_accuracy"] = class_accuracy(features, network, labels)
    if result["class_accuracy"] is None and network.classifies_labels:
        notes.append("no class accuracy: the samples do not record the class they were generated for")
    result["precision"] = result["recall"] = None
    if reference.activations is not None and min(n, len(reference.activations)) > PR_NEIGHBOURS:
        result["precision"], result["recall"] = precision_recall(
            reference.activations, features.pool, PR_NEIGHBOURS, device=device
        )
    else:
        notes.append("no precision/recall: the reference has no per-image features (give arr_0 images)")
    return result | {
        "num_samples": n,
        "num_reference": reference.count,
        "feature_network": network.identity,
        "notes": notes,
    }


def statistics_sha256(reference: Reference) -> str:
    """Fingerprint of the reference statistics the metrics were computed against: two FIDs are
    comparable only when this (and the feature network) agree, whatever the reference's URI."""
    digest = hashlib.sha256()
    for gaussian in (reference.pool, reference.spatial):
        if gaussian is not None:
            digest.update(np.ascontiguousarray(gaussian.mu, dtype=np.float64).tobytes())
            digest.update(np.ascontiguousarray(gaussian.sigma, dtype=np.float64).tobytes())
    return digest.hexdigest()


def class_accuracy(features: Features, network: FeatureNetwork, labels: np.ndarray | None) -> float | None:
    """The share of samples the network classifies as the class they were generated for; None
    unless the network classifies the dataset's own labels and every sample has a label in range."""
    if not network.classifies_labels or features.logits is None or labels is None:
        return None
    if len(labels) != len(features.logits) or labels.min() < 0 or labels.max() >= features.logits.shape[1]:
        return None
    return float((features.logits.argmax(axis=1) == labels).mean())


def _sampling_info(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """What produced the samples, when they come from `erw sample`."""
    if not manifest or manifest.get("format") != "erw-samples":
        return None
    return {key: manifest.get(key) for key in ("checkpoint", "step", "run_id", "settings")}


def write_outputs(out: str, result: dict[str, Any], grid: GridCollector, manifest: dict[str, Any] | None) -> None:
    names = (manifest or {}).get("class_names") or []
    classes = [names[c] if 0 <= c < len(names) else str(c) for c in grid.classes()]
    png = grid.png()
    storage.write_bytes(storage.join(out, "grid.png"), png)
    storage.write_bytes(storage.join(out, "summary.md"), report.markdown(result, "grid.png", classes).encode())
    storage.write_bytes(storage.join(out, "summary.html"), report.html_page(result, png, classes).encode())
    # Written last: its presence says the evaluation finished.
    storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(result, indent=2, default=_json_default).encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
