"""k-means quantizer: features [frames, dim] -> unit ids [frames] (nearest centroid).

Stored as a safetensors file holding `centroids` [K, dim] and the feature standardisation `mean`/`std` [dim]
applied before the distance (zeros/ones for HuBERT k-means models, which were fitted on raw features), so a
HuBERT + k-means checkpoint converted to this layout plugs into the same class.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class KMeansQuantizer:
    def __init__(self, centroids: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        if centroids.dim() != 2:
            raise ValueError(f"centroids must be [n_units, dim], got shape {tuple(centroids.shape)}")
        self.centroids = centroids.float().contiguous()
        dim = self.centroids.shape[1]
        self.mean = torch.zeros(dim) if mean is None else mean.float().reshape(dim)
        self.std = torch.ones(dim) if std is None else std.float().reshape(dim)
        self._centroid_sq = (self.centroids**2).sum(1)

    @property
    def n_units(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @classmethod
    def fit(
        cls,
        features: torch.Tensor | np.ndarray,
        n_units: int = 500,
        seed: int = 0,
        standardize: bool = True,
        batch_size: int = 4096,
        max_iter: int = 100,
        n_init: int = 3,
    ) -> "KMeansQuantizer":
        """Fit MiniBatchKMeans on [N, dim] frames (N >= n_units), after optional global standardisation."""
        from sklearn.cluster import MiniBatchKMeans

        x = torch.as_tensor(features, dtype=torch.float32)
        if x.dim() != 2 or x.shape[0] < n_units:
            raise ValueError(f"need at least n_units={n_units} feature frames [N, dim] to fit, got {tuple(x.shape)}")
        mean = x.mean(0) if standardize else torch.zeros(x.shape[1])
        std = x.std(0).clamp_min(1e-5) if standardize else torch.ones(x.shape[1])
        km = MiniBatchKMeans(n_clusters=n_units, random_state=seed, batch_size=batch_size, max_iter=max_iter,
                             n_init=n_init, compute_labels=False, max_no_improvement=20, reassignment_ratio=0.01)
        km.fit(((x - mean) / std).numpy())
        return cls(torch.from_numpy(km.cluster_centers_).float(), mean, std)

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, dim] -> LongTensor [frames] of nearest-centroid ids."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [frames, {self.dim}], got {tuple(features.shape)}")
        x = (features.float() - self.mean) / self.std
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 ; ||x||^2 does not change the argmin
        return (self._centroid_sq - 2.0 * x @ self.centroids.T).argmin(dim=1)

    def save(self, path: str | os.PathLike) -> None:
        save_file({"centroids": self.centroids, "mean": self.mean, "std": self.std}, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KMeansQuantizer":
        tensors = load_file(os.fspath(path))
        if "centroids" not in tensors:
            raise ValueError(f"{path}: no 'centroids' tensor (found {sorted(tensors)}); expected a k-means "
                             "quantizer saved by KMeansQuantizer.save")
        return cls(tensors["centroids"], tensors.get("mean"), tensors.get("std"))
