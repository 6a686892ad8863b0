"""Reference statistics: the Gaussians (and features) the samples are compared against.

Accepted references:

    ADM reference batch (.npz)  mu, sigma (pool3) and mu_s, sigma_s (spatial) as published with
                                guided-diffusion, and/or arr_0 images [N, H, W, 3]. Stored
                                statistics are used as they are (so FID matches the published
                                evaluator); arr_0 provides the features for precision/recall.
    erw reference file (.npz)   what this module caches: the same keys plus `activations` and the
                                `network` that computed them.
    an image dataset            erw shards with images, or an image source (see images.py):
                                features are computed once and cached as an erw reference file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from erw import storage
from erw.errors import ErwError
from erw.evaluation.features import FeatureNetwork, Features, extract_features
from erw.data.image_sets import ImageSet, ImageSetError, check_images_array, open_image_set, read_npz
from erw.evaluation.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures
from erw.evaluation.metrics import Gaussian

log = logging.getLogger(__name__)


class ReferenceError(ErwError):
    """A reference that cannot be used with this evaluation; the message says why and what to do."""


@dataclass
class Reference:
    source: str
    network: str  # identity of the network the statistics belong to
    count: int  # images behind the statistics (0 when only published statistics are known)
    pool: Gaussian
    spatial: Gaussian | None
    activations: np.ndarray | None  # pool features of reference images, for precision/recall

    def to_npz(self, **extra: np.ndarray) -> bytes:
        arrays = {
            "mu": self.pool.mu,
            "sigma": self.pool.sigma,
            "network": np.array(self.network),
            "source": np.array(self.source),
            "count": np.array(self.count),
            **extra,
        }
        if self.spatial is not None:
            arrays |= {"mu_s": self.spatial.mu, "sigma_s": self.spatial.sigma}
        if self.activations is not None:
            arrays["activations"] = self.activations
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()


def from_features(source: str, network: FeatureNetwork, features: Features) -> Reference:
    if features.count < 2:
        raise ReferenceError(f"the reference {source} has {features.count} image(s): statistics need at least 2")
    spatial = Gaussian.fit(features.spatial) if features.spatial is not None else None
    return Reference(source, network.identity, features.count, Gaussian.fit(features.pool), spatial, features.pool)


def load_reference(
    uri: str,
    network: FeatureNetwork,
    *,
    resolution: int,
    batch_size: int,
    device: str | torch.device,
    limit: int,
    cache: str = "",
) -> Reference:
    """The reference for `network`; `resolution` crops image sources, `limit` caps the images read."""
    if uri.endswith(".npz"):
        return _from_arrays(uri, _read(uri), network, batch_size, device, limit)
    from erw.data.sources import SourceError

    try:
        images = open_image_set(uri)
    except (ImageSetError, SourceError) as err:
        raise ReferenceError(f"reference {uri}: {err}") from None
    key = _cache_key(images, network, resolution, limit)
    cache = cache or storage.join(uri, f"reference-{key}.npz")
    if storage.exists(cache):
        arrays = _read(cache)
        if str(arrays.get("key")) == key:  # else: made for other images, network or limit
            log.info("reference statistics from the cache %s", cache)
            return _from_arrays(cache, arrays, network, batch_size, device, limit)
    features = extract_features(network, (x for x, _ in images.batches(batch_size, limit, resolution)), device)
    reference = from_features(uri, network, features)
    try:
        storage.write_bytes(cache, reference.to_npz(key=np.array(key)))
    except (storage.StorageError, OSError) as err:  # a read-only dataset: compute again next time
        log.warning("could not cache the reference statistics at %s: %s", cache, err)
    return reference


def _cache_key(images: ImageSet, network: FeatureNetwork, resolution: int, limit: int) -> str:
    """Changes whenever the network, its weights, the images, the crop or the limit change."""
    content = json.dumps(images.manifest, sort_keys=True) if images.manifest else images.source.listing_sha256
    text = f"{network.identity}|{content}|{resolution}|{limit}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(uri: str) -> dict[str, np.ndarray]:
    try:
        return read_npz(uri)
    except ImageSetError as err:
        raise ReferenceError(f"reference {err}") from None


def _from_arrays(
    uri: str,
    arrays: dict[str, np.ndarray],
    network: FeatureNetwork,
    batch_size: int,
    device: str | torch.device,
    limit: int,
) -> Reference:
    stored_by = str(arrays["network"]) if "network" in arrays else None
    if stored_by is not None and stored_by != network.identity:
        raise ReferenceError(
            f"the reference {uri} was computed with the feature network {stored_by}, this evaluation uses "
            f"{network.identity}: give the reference images (or an ADM reference batch) instead"
        )
    # ADM files carry no network: their statistics are those of the TF Inception.
    stats_usable = stored_by is not None or isinstance(network, InceptionFeatures)
    has_stats = stats_usable and "mu" in arrays and "sigma" in arrays
    images = arrays.get("arr_0")
    if not has_stats and images is None:
        wanted = "mu and sigma (from the same network) or arr_0 images"
        raise ReferenceError(f"the reference {uri} holds {', '.join(sorted(arrays)) or 'nothing'}: expected {wanted}")
    if images is not None:
        check_images_array(images, f"the reference {uri}")

    activations = arrays.get("activations")
    computed = None
    if activations is None and images is not None:
        used = images[:limit]
        batches = (
            torch.from_numpy(used[i : i + batch_size]).permute(0, 3, 1, 2) for i in range(0, len(used), batch_size)
        )
        computed = extract_features(network, batches, device)
        activations = computed.pool
    if not has_stats:
        return from_features(uri, network, computed)

    pool = Gaussian(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64))
    spatial = None
    if "mu_s" in arrays and "sigma_s" in arrays:
        spatial = Gaussian(arrays["mu_s"].astype(np.float64), arrays["sigma_s"].astype(np.float64))
    elif computed is not None and computed.spatial is not None:
        spatial = Gaussian.fit(computed.spatial)
    _check_shapes(uri, network, pool, spatial, activations)
    count = int(arrays["count"]) if "count" in arrays else (min(len(images), limit) if images is not None else 0)
    return Reference(uri, network.identity, count, pool, spatial, activations)


def _check_shapes(
    uri: str, network: FeatureNetwork, pool: Gaussian, spatial: Gaussian | None, activations: np.ndarray | None
) -> None:
    problems = []
    pool_dim = POOL_DIM if isinstance(network, InceptionFeatures) else pool.mu.shape[0]
    if pool.mu.shape != (pool_dim,) or pool.sigma.shape != (pool_dim, pool_dim):
        problems.append(
            f"mu {list(pool.mu.shape)} and sigma {list(pool.sigma.shape)} should be [{pool_dim}] and [{pool_dim}, {pool_dim}]"
        )
    if (
        spatial is not None
        and isinstance(network, InceptionFeatures)
        and (spatial.mu.shape != (SPATIAL_DIM,) or spatial.sigma.shape != (SPATIAL_DIM, SPATIAL_DIM))
    ):
        problems.append(
            f"mu_s {list(spatial.mu.shape)} and sigma_s {list(spatial.sigma.shape)} should be "
            f"[{SPATIAL_DIM}] and [{SPATIAL_DIM}, {SPATIAL_DIM}]"
        )
    if activations is not None and (activations.ndim != 2 or activations.shape[1] != pool_dim):
        problems.append(f"activations {list(activations.shape)} should be [N, {pool_dim}]")
    if problems:
        raise ReferenceError(
            f"the reference {uri} does not fit the {network.name} features:\n  - "
            + "\n  - ".join(problems)
            + "\nIt was made for another network or is not a reference batch"
        )
