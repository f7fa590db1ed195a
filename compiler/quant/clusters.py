"""CADyQ's deployment: the selectors' per-patch, per-layer bits clustered into a few engines.

A CADyQ network picks each adaptive layer's bits per patch (``compiler.quant.cadyq``): up to
``3 ** layers`` configurations, and its selectors read each layer's input, which a runtime does
not have before the network runs. A bundle holds one engine per image class (-1 / 0 / +1), routed
by the complexity statistic (``runtime.statistic``). So:

1. the selector network runs on calibration patches; each patch gives its per-layer bit vector;
2. k-means (``count`` <= 3 centres, deterministic: started from the patches sorted by mean bits
   cut into ``count`` equal groups, Lloyd iterations to a fixed point) groups those vectors; each
   centre is snapped to the nearest candidate bit-width per layer (a real engine), duplicates
   merged, configurations no patch is nearest to dropped, and the rest, ordered by mean bits,
   become the classes -1 / 0 / +1 (with fewer than three, the highest one serves the classes
   left over);
3. the router: the two complexity thresholds that maximise the share of patches whose routed
   class runs the configuration nearest to (L2 over the layers' bits) the selectors' own choice,
   searched exactly over every pair of cuts between distinct sorted complexities, among the
   pairs whose routed mean bits on these patches stay <= the selectors' own (the snapped
   configurations can sit above their clusters' mean bits: IMDN x4 W4A4 CADyQ, seed 0, budgeted
   on held features, ran Set5 at FAB 4.06 routed against the selectors' 4.02 without this).

The record keeps its selectors (``adasr eval`` still reports the selector network) and gains the
configurations as its bit vectors, the router as its image thresholds and the statistics in its
``clusters`` field (``compiler.quant.record.RecordClusters``); ``apply_record(..., routed=True)``
simulates the routed network and the engine plan builds one engine per configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import FORWARD_CHUNK, QuantizedSR
from compiler.quant.record import MAX_CLUSTERS, RecordClusters, clusters_json
from runtime.errors import ConfigError
from runtime.statistic import complexity_batch

CLUSTER_PATCHES = 400  # calibration patches whose selector bits are clustered
DEFAULT_CLUSTERS = MAX_CLUSTERS
MAX_ITERATIONS = 100
FAB_TOLERANCE = 1e-9  # float slack of the router's bit constraint

Bits = npt.NDArray[np.float64]  # [patches, adaptive layers]


@dataclass(frozen=True)
class Clustering:
    """Configurations per image class (-1, 0, +1), the router and how well it agrees."""

    vectors: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # classes -1, 0, +1
    thresholds: tuple[float, float]
    count: int  # distinct configurations
    agreement: float  # routed configuration == nearest configuration, share of patches
    shares: tuple[float, float, float]  # patches nearest to each class's configuration

    def record_clusters(self, patches: int) -> RecordClusters:
        return RecordClusters(self.count, patches, self.agreement, self.shares)


def selector_bits(qnet: QuantizedSR, patches: Tensor) -> Bits:
    """``[P, L]``: each patch's bits per adaptive layer as the selector network chooses them."""
    _require_selectors(qnet)
    rows = []
    qnet.eval()
    with torch.no_grad():
        for chunk in patches.split(FORWARD_CHUNK):
            qnet(chunk)
            rows.append(last_selector_bits(qnet, chunk.shape[0]))
    return np.concatenate(rows)


def last_selector_bits(qnet: QuantizedSR, batch: int) -> Bits:
    """``[batch, L]``: the bits the selector network chose in its last forward pass."""
    _require_selectors(qnet)
    adaptive = [conv for _, conv in qnet.qconvs() if conv.layer_index is not None]
    return torch.stack([conv.bits(batch) for conv in adaptive], dim=1).double().numpy()


def _require_selectors(qnet: QuantizedSR) -> None:
    if not qnet.settings.selector or qnet.routed:
        raise ConfigError("selector bits need a CADyQ network with its selectors")


def image_statistic(patches: Tensor) -> npt.NDArray[np.float64]:
    """The runtime's complexity of NCHW float patches in [0, 1] taken from uint8 images."""
    pixels = (patches.permute(0, 2, 3, 1).numpy() * 255.0).round().clip(0, 255)
    return complexity_batch(pixels.astype(np.uint8))


def nearest(bits: Bits, configs: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Index of the configuration nearest (L2) to each row of ``bits`` (ties: fewer bits)."""
    distance = ((bits[:, None, :] - configs[None, :, :]) ** 2).sum(axis=2)
    return np.argmin(distance, axis=1)


def kmeans(bits: Bits, count: int, candidates: Sequence[int]) -> npt.NDArray[np.float64]:
    """Up to ``count`` distinct configurations of ``candidates`` bits, by mean bits (module
    docstring, step 2); deterministic."""
    if not 1 <= count <= MAX_CLUSTERS:
        raise ConfigError(f"clusters must be 1..{MAX_CLUSTERS} (one engine per runtime image "
                          f"class), got {count}")
    order = np.argsort(bits.mean(axis=1), kind="stable")
    groups = np.array_split(order, min(count, len(order)))
    centres = np.stack([bits[g].mean(axis=0) for g in groups])
    labels = nearest(bits, centres)
    for _ in range(MAX_ITERATIONS):
        centres = np.stack([bits[labels == c].mean(axis=0) if (labels == c).any() else centres[c]
                            for c in range(len(centres))])
        new = nearest(bits, centres)
        if np.array_equal(new, labels):
            break
        labels = new
    grid = np.asarray(candidates, dtype=np.float64)
    snapped = grid[np.abs(centres[:, :, None] - grid).argmin(axis=2)]
    unique = np.unique(snapped, axis=0)
    unique = unique[np.unique(nearest(bits, unique))]  # a configuration no patch is nearest to
    return unique[np.lexsort((*unique.T[::-1], unique.mean(axis=1)))]


def fit_router(g: npt.NDArray[np.float64], target: npt.NDArray[np.intp],
               class_config: Sequence[int], class_bits: Sequence[float] | None = None,
               max_fab: float | None = None) -> tuple[tuple[float, float], float]:
    """Thresholds ``(lower, upper)`` routing ``g < lower`` to class -1, ``g > upper`` to +1 and
    the rest to 0 that maximise the share of patches whose class runs configuration ``target``
    (``class_config``: the configuration of each class); that share. Exact over all cuts. With
    ``max_fab``, only cuts whose routed mean bits (``class_bits``: each class's mean bits) stay
    <= ``max_fab`` count (the lowest such mean if none does)."""
    sort = np.argsort(g, kind="stable")
    values, wanted = g[sort], target[sort]
    total = len(values)
    prefix = [np.concatenate([[0], np.cumsum(wanted == c)]) for c in class_config]
    cuts = np.array([0, *[i for i in range(1, total) if values[i - 1] < values[i]], total])
    low, high = np.meshgrid(cuts, cuts, indexing="ij")  # patches below / not above
    score = (prefix[0][low] + prefix[1][high] - prefix[1][low]
             + prefix[2][total] - prefix[2][high]).astype(np.float64)
    score[high < low] = -1
    if max_fab is not None and class_bits is not None:
        fab = (low * class_bits[0] + (high - low) * class_bits[1]
               + (total - high) * class_bits[2]) / total
        fab[high < low] = np.inf
        over = fab > max(max_fab, float(fab.min())) + FAB_TOLERANCE
        score[over] = -1
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    agreement = float(score[i, j]) / total

    def cut(index: int) -> float:  # a threshold with ``index`` sorted values below it
        if index <= 0:
            return float(values[0]) - 1.0
        if index >= total:
            return float(values[-1]) + 1.0
        return float((values[index - 1] + values[index]) / 2)

    return (cut(int(cuts[i])), cut(int(cuts[j]))), agreement


def cluster(bits: Bits, g: npt.NDArray[np.float64], candidates: Sequence[int],
            count: int = DEFAULT_CLUSTERS) -> Clustering:
    """Cluster the selector ``bits`` of patches with complexities ``g`` (module docstring)."""
    configs = kmeans(bits, count, candidates)
    class_config = [min(c, len(configs) - 1) for c in range(MAX_CLUSTERS)]
    labels = nearest(bits, configs)
    class_bits = [float(configs[c].mean()) for c in class_config]
    thresholds, agreement = fit_router(g, labels, class_config, class_bits, float(bits.mean()))
    vectors = tuple(tuple(int(b) for b in configs[c]) for c in class_config)
    shares = [float(np.mean(labels == c)) if class_config.index(c) == k else 0.0
              for k, c in enumerate(class_config)]  # a repeated configuration counts once
    return Clustering((vectors[0], vectors[1], vectors[2]), thresholds, len(configs),
                      agreement, (shares[0], shares[1], shares[2]))


def cluster_record(record: Mapping[str, Any], qnet: QuantizedSR, patches: Tensor,
                   count: int = DEFAULT_CLUSTERS) -> dict[str, Any]:
    """``record`` (CADyQ JSON data of ``qnet``, its selector network) with its selectors'
    choices on ``patches`` clustered: the configurations as bit vectors, the router as image
    thresholds, the statistics as ``clusters`` (a new dict; ``record`` is not changed). ``qnet``
    takes the same deployment, so ``record_of(qnet, ...)`` writes it too."""
    bits = selector_bits(qnet, patches)
    selector = next(conv.selector for _, conv in qnet.qconvs() if conv.selector is not None)
    candidates = [int(b) for b in selector.candidates.tolist()]
    result = cluster(bits, image_statistic(patches), candidates, count)
    # float32 thresholds, as the simulation holds them (and as the runtime reads them exactly)
    thresholds = [float(np.float32(t)) for t in result.thresholds]
    deployment = {"bit_vectors": {str(d): list(v) for d, v in zip((-1, 0, 1), result.vectors,
                                                                   strict=True)},
                  "clusters": clusters_json(result.record_clusters(len(patches)))}
    with torch.no_grad():  # the router, as apply_record sets it
        qnet.image_to_bit.lower.fill_(thresholds[0])
        qnet.image_to_bit.upper.fill_(thresholds[1])
    qnet.deployment = deployment
    return {**record, **deployment, "image_thresholds": thresholds}


def cluster_calibration(record: Mapping[str, Any], qnet: QuantizedSR, calib_dir: Path,
                        config: Mapping[str, Any], count: int = DEFAULT_CLUSTERS
                        ) -> dict[str, Any]:
    """:func:`cluster_record` on ``CLUSTER_PATCHES`` patches of ``calib_dir``, sampled with the
    calibration's ``patch_size``, ``seed`` and ``downscale`` (``config``: its settings)."""
    patches = sample_patches(calib_dir, CLUSTER_PATCHES, config["patch_size"], config["seed"],
                             config["downscale"])
    return cluster_record(record, qnet, patches, count)
