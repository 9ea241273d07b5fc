"""What every step and evaluation reads: the dataset resident on the device (observations normalized
once), its fp32 metrics, and the early-stopping rule that watches them. Nothing a choice reads (the action
variance of the normalized MSE, the validation metrics) is computed from test rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from invdyn.normalizer import GaussianNormalizer
from pipeline.data.transitions import Transitions

EVAL_CHUNK = 16384  # rows per forward pass when evaluating (bounds memory, not results)


class EarlyStopping:
    """Stop after `patience` evaluations in a row that fail to beat the best value by more than
    `min_delta`."""

    def __init__(self, patience: int = 3, min_delta: float = 0.0):
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best = math.inf
        self.best_at = None
        self.bad_evals = 0

    def update(self, value: float, at=None) -> bool:
        """Record one evaluation; True when it is the new best."""
        if value < self.best - self.min_delta:
            self.best, self.best_at, self.bad_evals = float(value), at, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_evals > 0 and self.bad_evals >= self.patience


@dataclass
class Resident:
    """The dataset on the device, observations already normalized: what every step and evaluation reads."""

    obs: torch.Tensor
    next_obs: torch.Tensor
    act: torch.Tensor
    act_var: torch.Tensor  # per-dimension action variance over train + val rows (0 -> 1), for normalized MSE
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    test_idx: torch.Tensor  # only reported (finish's test_* metrics), never read while training

    @classmethod
    def build(
        cls, t: Transitions, normalizer: GaussianNormalizer, train_idx, val_idx, device, test_idx=None
    ) -> Resident:
        """Observations normalized with `normalizer` (the whole dataset's, as a planner's); actions as
        stored."""
        mean = torch.as_tensor(normalizer.mean, dtype=torch.float64)
        std = torch.as_tensor(normalizer.std, dtype=torch.float64)

        def normalized(a):
            return ((torch.as_tensor(np.asarray(a, dtype=np.float64)) - mean) / std).float().to(device)

        # the variance of the rows a choice may read: test actions must not move a validation number
        fit_rows = np.sort(np.concatenate([np.asarray(train_idx), np.asarray(val_idx)]))
        var = np.asarray(t.act[fit_rows], dtype=np.float64).var(0)
        test_idx = np.zeros(0, np.int64) if test_idx is None else test_idx
        return cls(
            normalized(t.obs),
            normalized(t.next_obs),
            torch.as_tensor(np.array(t.act, dtype=np.float32)).to(device),
            torch.as_tensor(np.where(var > 0, var, 1.0), device=device),
            torch.as_tensor(train_idx, device=device),
            torch.as_tensor(val_idx, device=device),
            torch.as_tensor(test_idx, dtype=torch.int64, device=device),
        )

    def mse(self, net, idx, chunk=EVAL_CHUNK) -> tuple[float, float]:
        """fp32 (action MSE, normalized action MSE) of `net` on rows `idx`, in eval mode, without
        gradients."""
        per_dim = self.per_dim_mse(net, idx, chunk)
        return float(per_dim.mean()), float((per_dim / self.act_var).mean())

    def per_dim_mse(self, net, idx, chunk=EVAL_CHUNK) -> torch.Tensor:
        """fp32 MSE of each action dimension of `net` on rows `idx` (float64, on the device)."""
        was_training = net.training
        net.eval()
        sq = torch.zeros(self.act.shape[1], dtype=torch.float64, device=self.act.device)
        with torch.inference_mode():
            for start in range(0, idx.shape[0], chunk):
                rows = idx[start : start + chunk]
                err = net(self.obs[rows], self.next_obs[rows]).float() - self.act[rows]
                sq += (err.double() ** 2).sum(0)
        net.train(was_training)
        return sq / max(int(idx.shape[0]), 1)

    def heldout_r2(self, net, idx=None) -> list:
        """R² of each action dimension on rows `idx` (default: validation; None where those actions are
        constant)."""
        idx = self.val_idx if idx is None else idx
        var = self.act[idx].double().var(0, correction=0)
        r2 = 1.0 - self.per_dim_mse(net, idx) / var
        return [float(v) if w > 0 else None for v, w in zip(r2.tolist(), var.tolist(), strict=True)]

    def baseline_mse(self, idx=None) -> tuple[float, float]:
        """(MSE, normalized MSE) of predicting the training split's mean action on rows `idx` (default:
        validation)."""
        idx = self.val_idx if idx is None else idx
        mean_act = self.act[self.train_idx].double().mean(0)
        per_dim = ((self.act[idx].double() - mean_act) ** 2).mean(0)
        return float(per_dim.mean()), float((per_dim / self.act_var).mean())
