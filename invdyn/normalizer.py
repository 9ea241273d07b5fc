"""Gaussian observation normalizer, CleanDiffuser-compatible (std 0 -> 1, actions untouched)."""

from __future__ import annotations

import numpy as np
import torch


class GaussianNormalizer:
    """`(x - mean) / std` per dimension; works on numpy arrays and torch tensors of any leading shape."""

    def __init__(self, mean, std):
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"normalizer mean has {mean.shape[0]} dims but std has {std.shape[0]}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ValueError("normalizer mean/std contain NaN or inf")
        if (std < 0).any():
            raise ValueError("normalizer std must be >= 0")
        std = np.where(std == 0, 1.0, std)
        self.mean, self.std = mean, std
        self._cache: dict = {}

    @classmethod
    def from_data(cls, x) -> GaussianNormalizer:
        """Statistics of all rows of `x` (N, dim), computed in float64 like CleanDiffuser's numpy code."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"need a non-empty (N, dim) array to fit a normalizer, got shape {x.shape}")
        x64 = x.astype(np.float64, copy=False)
        return cls(x64.mean(0), x64.std(0))

    @classmethod
    def from_dict(cls, d: dict) -> GaussianNormalizer:
        return cls(d["mean"], d["std"])

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _stats(self, x):
        if isinstance(x, torch.Tensor):
            key = (x.device, x.dtype)
            if key not in self._cache:
                self._cache[key] = (
                    torch.as_tensor(self.mean, dtype=x.dtype, device=x.device),
                    torch.as_tensor(self.std, dtype=x.dtype, device=x.device),
                )
            return self._cache[key]
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        return self.mean.astype(dtype), self.std.astype(dtype)

    def _check(self, x):
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"normalizer expects last dimension {self.dim}, got shape {tuple(x.shape)}")

    @staticmethod
    def _as_float(x):
        """Integer inputs are promoted (torch would otherwise cast mean/std to ints)."""
        if isinstance(x, torch.Tensor):
            return x if x.is_floating_point() else x.float()
        return np.asarray(x)

    def normalize(self, x):
        x = self._as_float(x)
        self._check(x)
        mean, std = self._stats(x)
        return (x - mean) / std

    def check(self, planner, std=None, *, atol: float = 1e-2) -> None:
        """Raise NormalizerMismatchError naming the dimensions unless `planner` normalizes observations
        as this normalizer does, within `atol` (normalized units) from mean - 2 std to mean + 2 std.

        `planner` is a planner's normalizer (CleanDiffuser's GaussianNormalizer, diffuser / Decision
        Diffuser's CDFNormalizer or DatasetNormalizer, anything with `normalize`) or a mean, with `std`.
        """
        from .planner_norms import compare

        compare(self.mean, self.std, planner, std, atol=atol)

    def unnormalize(self, x):
        x = self._as_float(x)
        self._check(x)
        mean, std = self._stats(x)
        return x * std + mean
