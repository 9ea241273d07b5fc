"""A planner's observation normalizer (CleanDiffuser's Gaussian, diffuser / Decision Diffuser's CDF, a
(mean, std) pair) held against a model's: which dimensions disagree, and the way back to raw states."""

from __future__ import annotations

import numpy as np
import torch

from .errors import NormalizerMismatchError

#: where the two normalizations are compared: the model's mean + z * std for each z, in every dimension
PROBE_Z = np.linspace(-2.0, 2.0, 9)
#: dimensions named in an error message at most (the count of the rest is given)
_SHOWN = 8


class _MeanStd:
    """A bare (mean, std) pair as a normalizer, std 0 read as 1 (as CleanDiffuser and invdyn do)."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float64).reshape(-1)
        std = np.asarray(std, np.float64).reshape(-1)
        if self.mean.shape != std.shape:
            raise NormalizerMismatchError(
                f"the planner's mean has {self.mean.shape[0]} dims but its std has {std.shape[0]}"
            )
        self.std = np.where(std == 0, 1.0, std)

    def normalize(self, x):
        return (x - self.mean) / self.std

    def unnormalize(self, x):
        return x * self.std + self.mean


def observation_normalizer(planner, std=None):
    """The object that normalizes observations: `planner` itself, a `(mean, std)` pair made one, or the
    "observations" entry of diffuser's DatasetNormalizer (one normalizer per field)."""
    if std is not None:
        return _MeanStd(planner, std)
    if isinstance(planner, (tuple, list)) and len(planner) == 2:
        return _MeanStd(*planner)
    fields = getattr(planner, "normalizers", None)
    if isinstance(fields, dict) and "observations" in fields:
        return fields["observations"]
    if not callable(getattr(planner, "normalize", None)):
        raise TypeError(
            f"{type(planner).__name__} is not a normalizer: pass an object with normalize / unnormalize "
            "(CleanDiffuser's GaussianNormalizer, diffuser's CDFNormalizer or DatasetNormalizer) or mean, std"
        )
    return planner


def planner_dim(norm) -> int | None:
    """How many dimensions the planner's normalizer was fit on, where it says (mean, or diffuser's X)."""
    for attr in ("mean", "X", "mins"):
        value = getattr(norm, attr, None)
        if value is not None and np.ndim(value) >= 1:
            return int(np.shape(value)[-1])
    return None


def compare(mean: np.ndarray, std: np.ndarray, planner, planner_std=None, *, atol: float = 1e-2) -> None:
    """Raise NormalizerMismatchError naming the dimensions where `planner` normalizes states differently
    from `(x - mean) / std` by more than `atol` (normalized units) at the probe states."""
    norm = observation_normalizer(planner, planner_std)
    dim = mean.shape[0]
    theirs = planner_dim(norm)
    if theirs is not None and theirs != dim:
        raise NormalizerMismatchError(
            f"the planner's {type(norm).__name__} normalizes {theirs}-dim observations but the model's "
            f"obs_dim is {dim}: they were made for different environments"
        )
    probe = (mean + PROBE_Z[:, None] * std).astype(np.float32)  # (len(PROBE_Z), dim)
    try:
        got = np.asarray(norm.normalize(probe.copy()), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a planner's own code may raise anything
        raise NormalizerMismatchError(
            f"the planner's {type(norm).__name__}.normalize failed on {dim}-dim observations "
            f"({type(e).__name__}: {e})"
        ) from None
    if got.shape != probe.shape:
        raise NormalizerMismatchError(
            f"the planner's {type(norm).__name__}.normalize turned {probe.shape} states into {got.shape}"
        )
    gap = np.abs(got - PROBE_Z[:, None]).max(axis=0)
    bad = np.flatnonzero(~(gap <= atol))  # NaN counts as a difference
    if bad.size:
        raise NormalizerMismatchError(_mismatch_message(norm, mean, std, got, bad, gap, atol))


def _mismatch_message(norm, mean, std, got, bad, gap, atol) -> str:
    kind = type(norm).__name__
    lines = [
        f"the planner's {kind} does not normalize observations as this model does ((x - mean) / std with "
        f"the training data's statistics): {bad.size} of {mean.shape[0]} dims differ, "
        f"{bad[:_SHOWN].tolist()}{' ...' if bad.size > _SHOWN else ''} (tolerance {atol:g} in normalized "
        "units)"
    ]
    their_mean, their_std = getattr(norm, "mean", None), getattr(norm, "std", None)
    for d in bad[:_SHOWN]:
        if their_mean is not None and their_std is not None:
            theirs = f"planner mean {np.ravel(their_mean)[d]:.6g} std {np.ravel(their_std)[d]:.6g}"
        else:
            theirs = f"planner maps model mean + 2 std to {got[-1, d]:.4g} (the model: 2)"
        lines.append(
            f"  dim {d}: model mean {mean[d]:.6g} std {std[d]:.6g}; {theirs}; largest gap {gap[d]:.3g}"
        )
    lines.append(
        "Train the planner and the model on the same dataset, or give the planner's normalizer to "
        "predict_normalized(obs, next_obs, normalizer=planner_normalizer), which converts its states."
    )
    return "\n".join(lines)


def to_raw(planner, x):
    """Planner-normalized states `x` (numpy or torch, any leading shape) back to raw states, same type."""
    norm = observation_normalizer(planner)
    if isinstance(x, torch.Tensor):
        mean, std = getattr(norm, "mean", None), getattr(norm, "std", None)
        if mean is not None and std is not None:  # stays on the tensor's device
            std = torch.as_tensor(np.where(np.asarray(std) == 0, 1.0, std), dtype=x.dtype, device=x.device)
            return x * std + torch.as_tensor(np.asarray(mean), dtype=x.dtype, device=x.device)
        raw = np.asarray(norm.unnormalize(x.detach().cpu().numpy()), dtype=np.float32)
        return torch.from_numpy(raw).to(x.device)
    raw = norm.unnormalize(np.asarray(x, dtype=np.float32))
    return np.asarray(raw, dtype=np.float32)
