"""Similar-image search: a cosine nearest-neighbour index of a dataset's pooled block features
(:mod:`contrastive_lw.features`), saved with what it was built from, and precision@k of it.

Search is exact by default (one matmul of L2-normalised features); ``backend="faiss"`` adds an
approximate HNSW index (faiss-cpu, ``pip install contrastive-lw[search]``) for collections too
large to scan.

Example:
    >>> index = SearchIndex.build(features, labels, describe(net, [2], 4))   # doctest: +SKIP
    >>> scores, neighbours = index.search(query_features, top=8)              # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError, UserError
from .features import check_images, describe, export_features, load_features, save_features

BACKENDS = ("exact", "faiss")
INDEX_FILE, FAISS_FILE = "index.npz", "index.faiss"


@dataclass
class SearchIndex:
    """L2-normalised ``features`` N x D (float32), their ``labels`` (or None), the ``meta`` they
    were built from (:func:`~contrastive_lw.features.describe`, plus ``backend``), and the faiss
    index when ``meta["backend"] == "faiss"``."""

    features: torch.Tensor
    labels: torch.Tensor | None
    meta: dict[str, Any]
    approximate: Any = None

    @classmethod
    def build(cls, features: torch.Tensor, labels: torch.Tensor | None, meta: dict[str, Any],
              backend: str = "exact") -> SearchIndex:
        if backend not in BACKENDS:
            raise ConfigError(f"search backend must be one of {list(BACKENDS)}, got {backend!r}")
        index = cls(F.normalize(features.float(), dim=1), labels, {**meta, "backend": backend})
        if backend == "faiss":
            faiss = _faiss()
            index.approximate = faiss.IndexHNSWFlat(features.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.approximate.add(index.features.numpy())
        return index

    def save(self, directory: str | Path) -> Path:
        """``directory/index.npz`` (features, labels, meta) and ``index.faiss`` for the faiss backend."""
        directory = Path(directory)
        save_features(directory / INDEX_FILE, self.features, self.labels, self.meta)
        if self.approximate is not None:
            _faiss().write_index(self.approximate, str(directory / FAISS_FILE))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SearchIndex:
        directory = Path(directory)
        if not (directory / INDEX_FILE).is_file():
            raise DataError(f"{directory} holds no search index ({INDEX_FILE}): build one with `search index`")
        features, labels, meta = load_features(directory / INDEX_FILE)
        index = cls(torch.from_numpy(features).float(), None if labels is None else torch.from_numpy(labels), meta)
        if meta.get("backend") == "faiss":
            index.approximate = _faiss().read_index(str(directory / FAISS_FILE))
        return index

    def check(self, description: dict[str, Any]) -> None:
        """A UserError unless ``description`` (backbone, layers, pool) is what the index was built from."""
        differs = [key for key in ("backbone", "layers", "pool") if description.get(key) != self.meta.get(key)]
        if differs:
            raise UserError(f"the index was built from another {' / '.join(differs)} (init "
                            f"{self.meta.get('init')}, blocks {self.meta.get('layers')}, pool {self.meta.get('pool')}): "
                            "query it with those, or build a new index with `search index`")

    def search(self, queries: torch.Tensor, top: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and indices (Q x ``top``, best first) of the nearest indexed items."""
        if top < 1:
            raise ConfigError(f"--top must be a positive number of neighbours, got {top}")
        queries, top = F.normalize(queries.float(), dim=1), min(top, len(self.features))
        if self.approximate is not None:
            scores, indices = self.approximate.search(queries.numpy(), top)
            return torch.from_numpy(scores), torch.from_numpy(indices).long()
        return (queries @ self.features.T).topk(top, dim=1)

    def search_images(self, net: nn.Module, images: torch.Tensor, top: int = 8,
                      what: str = "query images") -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` for uint8 ``images`` through ``net``, after checking that ``net`` is the
        backbone the index was built from and that the images have its channels and size."""
        self.check(describe(net, self.meta["layers"], self.meta["pool"]))
        check_images(images, net.in_channels, tuple(self.meta["image_size"]), what)
        return self.search(export_features(net, images, self.meta["layers"], self.meta["pool"], progress=False), top)


def precision_at_k(features: torch.Tensor, labels: torch.Tensor, k: int = 10, batch_size: int = 1024) -> float:
    """Mean fraction of each item's ``k`` nearest other items (cosine, exact) that share its label."""
    if not 1 <= k < len(features):
        raise ConfigError(f"precision@k needs 1 <= k < {len(features)} items, got k={k}")
    x = F.normalize(features.float(), dim=1)
    hits = 0
    for start in range(0, len(x), batch_size):
        similarity = x[start: start + batch_size] @ x.T
        rows = torch.arange(len(similarity))
        similarity[rows, rows + start] = -float("inf")  # an item is not its own neighbour
        neighbours = similarity.topk(k, dim=1).indices
        hits += int((labels[neighbours] == labels[start: start + batch_size, None]).sum())
    return hits / (len(x) * k)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("the faiss backend needs faiss-cpu: pip install contrastive-lw[search]") from None
    return faiss
