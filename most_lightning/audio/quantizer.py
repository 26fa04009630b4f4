"""k-means quantizer: features [frames, dim] -> unit ids [frames] (nearest centroid).

Stored as a safetensors file holding `centroids` [K, dim] and the feature standardisation `mean`/`std` [dim]
applied before the distance (zeros/ones for HuBERT k-means models, which were fitted on raw features).
`load` also reads the centroid files HuBERT k-means models ship as (no standardisation):
- `.npy`: a [K, dim] array (textlesslib's `*.centroids.npy`), read with allow_pickle=False;
- `.pt`/`.pth`: a tensor or numpy array [K, dim], or a dict with `cluster_centers` (+ `n_clusters`), the
  layout of SpiritLM's KmeansModel, read with torch.load(weights_only=True) and numpy's array globals only.
scikit-learn k-means saved with joblib (e.g. TWIST's `*_km500.bin`) is a pickle and is NOT loaded (it could run
code); the error says how to convert it once, in a trusted environment, to `.npy`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file


CENTROID_KEYS = ("centroids", "cluster_centers", "C")
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


class QuantizerFileError(ValueError):
    """A k-means file that cannot be used; names the file (and key) and the fix."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"k-means quantizer {path}: {reason}")
        self.path, self.reason = path, reason


class KMeansQuantizer:
    kind = "kmeans"
    source: str = "<fitted>"  # file it was loaded from, for error messages

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
    def load(cls, path: str | os.PathLike, expected_dim: int | None = None,
             feature_source: str = "the encoder") -> "KMeansQuantizer":
        """Read .safetensors (ours), .npy or .pt centroids; with expected_dim, check it against the features."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise QuantizerFileError(path, "no such file")
        key = "centroids"
        if path.endswith(".safetensors"):
            tensors = load_file(path)
            if "centroids" not in tensors:
                raise QuantizerFileError(path, f"no 'centroids' tensor (found {sorted(tensors)}); expected a k-means "
                                         "quantizer saved by KMeansQuantizer.save")
            quantizer = cls(tensors["centroids"], tensors.get("mean"), tensors.get("std"))
        elif path.endswith(".npy"):
            try:
                centroids = np.load(path, allow_pickle=False)
            except ValueError as exn:
                raise QuantizerFileError(path, f"not a plain numpy array ({exn})") from exn
            quantizer = cls(_centroid_tensor(centroids, path, "<array>"))
            key = "<array>"
        elif path.endswith(PICKLE_SUFFIXES):
            raise QuantizerFileError(path, _PICKLE_HINT)
        else:
            key, centroids = _read_torch_centroids(path)
            quantizer = cls(_centroid_tensor(centroids, path, key))
        quantizer.source = path
        if expected_dim is not None and quantizer.dim != expected_dim:
            raise QuantizerFileError(path, f"centroids (key {key!r}) are {quantizer.dim}-d but {feature_source} "
                                     f"gives {expected_dim}-d features: a k-means model of another layer or model")
        return quantizer


_PICKLE_HINT = ("scikit-learn/joblib k-means files are pickles and are not loaded here (unpickling can run code). "
                "Convert once, in an environment you trust: "
                "python -c \"import joblib, numpy; numpy.save('centroids.npy', joblib.load('km.bin').cluster_centers_)\"")


def _centroid_tensor(value, path: str, key: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 2 or not t.is_floating_point():
        raise QuantizerFileError(path, f"key {key!r}: centroids must be a float [n_units, dim] array, got "
                                 f"{t.dtype} {tuple(t.shape)}")
    return t.float()


def _read_torch_centroids(path: str):
    import pickle
    import re

    safe = [np.ndarray, np.dtype, np._core.multiarray._reconstruct if hasattr(np, "_core") else
            np.core.multiarray._reconstruct]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        found = re.search(r"GLOBAL (\S+)", str(exn))
        raise QuantizerFileError(path, f"torch.load(weights_only=True) refused global "
                                 f"{found.group(1) if found else '?'!r}. " + _PICKLE_HINT) from exn
    except Exception as exn:  # a joblib file is not a torch zip archive either
        raise QuantizerFileError(path, f"cannot read it with torch.load ({type(exn).__name__}). "
                                 + _PICKLE_HINT) from exn
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return "<tensor>", obj
    if isinstance(obj, dict):
        for key in CENTROID_KEYS:
            if key in obj:
                n = obj.get("n_clusters")
                if n is not None and int(n) != len(obj[key]):
                    raise QuantizerFileError(path, f"n_clusters={n} but key {key!r} has {len(obj[key])} rows")
                return key, obj[key]
        if "model_weight" in obj and "model_cfg" in obj:
            raise QuantizerFileError(path, "this is SpiritLM's linear (CTC) quantizer, not k-means centroids; it is "
                                     "not supported")
        raise QuantizerFileError(path, f"no centroid key among {list(CENTROID_KEYS)} (has {sorted(obj)[:8]})")
    raise QuantizerFileError(path, f"holds a {type(obj).__name__}, expected centroids")
