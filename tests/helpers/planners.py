"""Re-creations of planners' observation normalizers, line for line: CleanDiffuser's GaussianNormalizer
(cleandiffuser/dataset/base_dataset.py) and diffuser's CDFNormalizer / DatasetNormalizer
(diffuser/datasets/normalization.py, which Decision Diffuser uses). scipy's interp1d is np.interp here."""

from __future__ import annotations

import numpy as np


class CleanDiffuserGaussianNormalizer:
    def __init__(self, X: np.ndarray, start_dim: int = -1):
        total_dims = X.ndim
        if start_dim < 0:
            start_dim = total_dims + start_dim
        axes = tuple(range(start_dim))
        self.mean = np.mean(X, axis=axes)
        self.std = np.std(X, axis=axes)
        self.std[self.std == 0] = 1.0

    def normalize(self, x: np.ndarray):
        ndim = x.ndim
        return (x - self.mean[(None,) * (ndim - self.mean.ndim)]) / self.std[(None,) * (ndim - self.std.ndim)]

    def unnormalize(self, x: np.ndarray):
        ndim = x.ndim
        return x * self.std[(None,) * (ndim - self.std.ndim)] + self.mean[(None,) * (ndim - self.mean.ndim)]


def _empirical_cdf(sample):
    quantiles, counts = np.unique(sample, return_counts=True)
    cumprob = np.cumsum(counts).astype(np.double) / sample.size
    return quantiles, cumprob


def _atleast_2d(x):
    if x.ndim < 2:
        x = x[:, None]
    return x


class Normalizer:
    def __init__(self, X):
        self.X = X.astype(np.float32)
        self.mins = X.min(axis=0)
        self.maxs = X.max(axis=0)


class CDFNormalizer1d:
    def __init__(self, X):
        assert X.ndim == 1
        self.X = X.astype(np.float32)
        if self.X.max() == self.X.min():
            self.constant = True
        else:
            self.constant = False
            quantiles, cumprob = _empirical_cdf(self.X)
            self.fn = lambda x, q=quantiles, c=cumprob: np.interp(x, q, c)
            self.inv = lambda y, q=quantiles, c=cumprob: np.interp(y, c, q)
            self.xmin, self.xmax = quantiles.min(), quantiles.max()
            self.ymin, self.ymax = cumprob.min(), cumprob.max()

    def normalize(self, x):
        if self.constant:
            return x
        x = np.clip(x, self.xmin, self.xmax)
        y = self.fn(x)
        return 2 * y - 1

    def unnormalize(self, x, eps=1e-4):
        if self.constant:
            return x
        x = (x + 1) / 2.0
        x = np.clip(x, self.ymin, self.ymax)
        return self.inv(x)


class CDFNormalizer(Normalizer):
    def __init__(self, X):
        super().__init__(_atleast_2d(X))
        self.dim = self.X.shape[1]
        self.cdfs = [CDFNormalizer1d(self.X[:, i]) for i in range(self.dim)]

    def wrap(self, fn_name, x):
        shape = x.shape
        x = x.reshape(-1, self.dim)
        out = np.zeros_like(x)
        for i, cdf in enumerate(self.cdfs):
            fn = getattr(cdf, fn_name)
            out[:, i] = fn(x[:, i])
        return out.reshape(shape)

    def normalize(self, x):
        return self.wrap("normalize", x)

    def unnormalize(self, x):
        return self.wrap("unnormalize", x)


class DatasetNormalizer:
    def __init__(self, dataset: dict, normalizer=CDFNormalizer):
        self.observation_dim = dataset["observations"].shape[1]
        self.normalizers = {key: normalizer(val) for key, val in dataset.items()}

    def normalize(self, x, key):
        return self.normalizers[key].normalize(x)

    def unnormalize(self, x, key):
        return self.normalizers[key].unnormalize(x)
