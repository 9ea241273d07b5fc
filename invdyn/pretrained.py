"""A loaded model: network + normalizer + metadata, ready to predict on raw or normalized observations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import InvdynError
from .normalizer import GaussianNormalizer


class PretrainedIDM(nn.Module):
    """What `invdyn.load` returns. `predict` takes raw observations; `predict_normalized` normalized ones."""

    def __init__(
        self,
        net: nn.Module,
        normalizer: GaussianNormalizer,
        params: dict,
        card: str = "",
        path=None,
        source=None,
    ):
        super().__init__()
        self.net = net.eval()
        self.normalizer = normalizer
        self.params = params
        self.card = card
        self.path = Path(path) if path is not None else None
        #: where it was loaded from: a directory, "invdyn cache", "CleanDiffuser", a URL or an MLflow URI
        self.source = str(source) if source is not None else (str(self.path) if self.path else None)
        self.eval()  # a loaded model is for inference: module and network both in eval mode

    @property
    def name(self) -> str:
        return self.params.get("name", "")

    @property
    def obs_dim(self) -> int:
        return self.net.obs_dim

    @property
    def act_dim(self) -> int:
        return self.net.act_dim

    @property
    def metrics(self) -> dict:
        return self.params.get("metrics") or {}

    @property
    def jump(self) -> int:
        """k of a_t = I(s_t, s_{t+k}): 1 for a one-step model (and for directories written before jumps)."""
        training = self.params.get("training") or {}
        return int(self.params.get("jump") or training.get("jump") or 1)

    def _with_source(self, source, path=...) -> PretrainedIDM:
        self.source = str(source)
        if path is not ...:
            self.path = path
        return self

    def forward(self, obs, next_obs):
        return self.net(obs, next_obs)

    @torch.no_grad()
    def predict_normalized(self, obs, next_obs, *, normalizer=None, return_std: bool = False):
        """The network's output for observations already normalized (exactly CleanDiffuser's `predict`).

        `normalizer`: the planner's normalizer that made them (see `GaussianNormalizer.check` for the kinds
        accepted): its states are unnormalized with it and normalized with the model's, so a planner
        trained with other statistics or a CDF normalization feeds the model what it was trained on.
        `return_std` needs an ensemble (`EnsembleIDM`); a single model raises.
        """
        if return_std:
            _needs_ensemble("predict(..., return_std=True)")
        if normalizer is not None:
            from .planner_norms import to_raw

            return self.predict(to_raw(normalizer, obs), to_raw(normalizer, next_obs))
        return self.net.predict(obs, next_obs)

    @torch.no_grad()
    def predict(self, obs, next_obs, *, return_std: bool = False):
        """Actions for raw observations: normalized with the dataset's mean/std, then the network.
        An ensemble's `return_std=True` gives (mean, std per action dimension)."""
        if not isinstance(obs, torch.Tensor):
            obs = np.asarray(obs, dtype=np.float32)
        if not isinstance(next_obs, torch.Tensor):
            next_obs = np.asarray(next_obs, dtype=np.float32)
        self.net.check_input(obs, "obs")  # clear error on a wrong last dimension before normalizing
        self.net.check_input(next_obs, "next_obs")
        obs_n, next_n = self.normalizer.normalize(obs), self.normalizer.normalize(next_obs)
        return self.predict_normalized(obs_n, next_n, return_std=return_std)

    def feasibility(self, obs, next_obs):
        """One plausibility score per pair: an ensemble's (`EnsembleIDM.feasibility`); a single model
        raises."""
        _needs_ensemble("feasibility(obs, next_obs)")

    def __repr__(self) -> str:
        return (
            f"PretrainedIDM(name={self.name!r}, obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
            f"source={self.source!r})"
        )


def _needs_ensemble(what: str):
    raise InvdynError(
        f"{what} needs an ensemble, and this is a single model: load an ensemble directory (one made by "
        "`python -m pipeline.train --ensemble K` or `python -m pipeline.pretrain_all --ensemble K`)"
    )
