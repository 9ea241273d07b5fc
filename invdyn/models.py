"""Inverse dynamics networks with CleanDiffuser's exact layer layout and state-dict keys, and the registry
of architectures a model directory can name."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .errors import ShapeError


class _InvDynBase(nn.Module):
    """Shared forward/predict logic; subclasses build `self.mlp`. The output is multiplied by `action_scale`
    when the tanh output is on, as in CleanDiffuser."""

    #: registry name written to params.json["architecture"]["name"]
    arch_name = ""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden_dim: int, tanh_out_activation: bool, action_scale: float
    ):
        super().__init__()
        for key, value in (("obs_dim", obs_dim), ("act_dim", act_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.obs_dim, self.act_dim, self.hidden_dim = int(obs_dim), int(act_dim), int(hidden_dim)
        self.tanh_out_activation = bool(tanh_out_activation)
        self.action_scale = float(action_scale)

    @property
    def config(self) -> dict:
        """Constructor arguments, exactly the keys CleanDiffuser's class accepts (its params.json
        "config")."""
        return {
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "hidden_dim": self.hidden_dim,
            "tanh_out_activation": self.tanh_out_activation,
            "action_scale": self.action_scale,
        }

    @property
    def options(self) -> dict:
        """Our constructor arguments that CleanDiffuser's class does not have (stored beside "config")."""
        return {}

    def _init_delta(self, delta_input: bool) -> int:
        """Register the s' - s feature's buffers when `delta_input`; returns the first layer's width.

        Why its own scale: the one-step difference is small next to the state's spread, so in the states'
        normalized units it sits near 0 with a tiny spread and the net barely sees it. `delta_scale` /
        `delta_shift` make it the difference normalized by its own mean / std over the training pairs (the
        trainer sets them once, from the training rows only, before the first step; `set_delta_stats`)."""
        if not isinstance(delta_input, (bool, np.bool_)):
            raise ValueError(f"delta_input must be true or false, got {delta_input!r}")
        self.delta_input = bool(delta_input)
        if self.delta_input:
            self.register_buffer("delta_scale", torch.ones(self.obs_dim))
            self.register_buffer("delta_shift", torch.zeros(self.obs_dim))
        return (3 if self.delta_input else 2) * self.obs_dim

    @property
    def uses_delta_stats(self) -> bool:
        """True when the net holds the s' - s buffers that `set_delta_stats` fills."""
        return "delta_shift" in self._buffers

    @torch.no_grad()
    def set_delta_stats(self, obs: torch.Tensor, next_obs: torch.Tensor) -> None:
        """Set the s' - s buffers from normalized training pairs (rows, obs_dim): d_n = (d - mean) / std of
        d = next_obs - obs (float64; a constant dimension keeps std 1)."""
        if not self.uses_delta_stats:
            raise ValueError(f"{type(self).__name__} was built without delta_input: it has no s' - s buffers")
        d = next_obs.to(torch.float64) - obs.to(torch.float64)
        if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] != self.obs_dim:
            raise ShapeError(f"delta statistics need (rows > 0, {self.obs_dim}) pairs, got {tuple(d.shape)}")
        mean, std = d.mean(0), d.std(0, correction=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        self.delta_scale.copy_(1.0 / std)
        self.delta_shift.copy_(-mean / std)

    def features(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """The first layer's input: (s, s'), or (s, s', normalized s' - s) with `delta_input`."""
        if not self.uses_delta_stats:  # res_mlp computes its own s' - s in its forward
            return torch.cat([obs, next_obs], -1)
        delta = (next_obs - obs) * self.delta_scale + self.delta_shift
        return torch.cat([obs, next_obs, delta], -1)

    def forward(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.features(obs, next_obs))
        if self.tanh_out_activation:
            out = out * self.action_scale
        return out

    def check_input(self, x, name: str) -> None:
        """Raise ShapeError unless `x` (array or tensor) ends in obs_dim."""
        if x.ndim == 0 or x.shape[-1] != self.obs_dim:
            raise ShapeError(
                f"{name} has last dimension {x.shape[-1] if x.ndim else None} (shape {tuple(x.shape)}), "
                f"but this model expects obs_dim={self.obs_dim}"
            )

    def _as_input(self, x, name: str) -> torch.Tensor:
        self.check_input(x, name)
        param = next(self.parameters())
        if isinstance(x, np.ndarray) and (not x.flags.writeable or min(x.strides, default=0) < 0):
            # torch cannot share read-only memory (a memory-mapped cache: it warns) nor negative strides
            # (it refuses): only these arrays are copied
            x = np.array(x)
        return torch.as_tensor(x).to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def predict(self, obs, next_obs):
        """Actions for (obs, next_obs) of any leading shape; numpy in -> numpy out. No gradients."""
        is_numpy = not isinstance(obs, torch.Tensor)
        obs_t = self._as_input(obs if not is_numpy else np.asarray(obs, dtype=np.float32), "obs")
        nxt = next_obs if isinstance(next_obs, torch.Tensor) else np.asarray(next_obs, dtype=np.float32)
        next_t = self._as_input(nxt, "next_obs")
        if obs_t.shape != next_t.shape:
            raise ShapeError(
                f"obs shape {tuple(obs_t.shape)} and next_obs shape {tuple(next_t.shape)} differ"
            )
        lead = obs_t.shape[:-1]
        out = self.forward(obs_t.reshape(-1, self.obs_dim), next_t.reshape(-1, self.obs_dim))
        out = out.reshape(*lead, self.act_dim)
        return out.float().cpu().numpy() if is_numpy else out


class MlpInvDynamic(_InvDynBase):
    """CleanDiffuser's plain MLP IDM: mlp.0 Linear, mlp.2 Linear, mlp.4 Linear (ReLU between, Tanh|Identity
    out). `delta_input` (invdyn's option, off by default; CleanDiffuser cannot load it) adds s' - s."""

    arch_name = "mlp"

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 512,
        tanh_out_activation: bool = True,
        action_scale: float = 1.0,
        delta_input: bool = False,
    ):
        super().__init__(obs_dim, act_dim, hidden_dim, tanh_out_activation, action_scale)
        width = self._init_delta(delta_input)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, act_dim),
            nn.Tanh() if tanh_out_activation else nn.Identity(),
        )

    @property
    def options(self) -> dict:
        return {"delta_input": True} if self.delta_input else {}


class FancyMlpInvDynamic(_InvDynBase):
    """CleanDiffuser's default IDM: LayerNorm + tanh-GELU + dropout; dropout rate configurable (default 0.1).

    mlp.0 Linear, mlp.1 LayerNorm|Identity, GELU(tanh), Dropout|Identity, mlp.4 Linear,
    mlp.5 LayerNorm|Identity, GELU(tanh), mlp.7 Linear, Tanh|Identity.

    `delta_input` (invdyn's option, off by default; CleanDiffuser cannot load it) adds the normalized
    s' - s as a third input (`_InvDynBase._init_delta`; 0.91x the test MSE on walker2d-mixed,
    bench/studies/quality_limits.md). CleanDiffuser's loader `FancyMlpInvDynamic.from_pretrained(name)` is
    attached by invdyn.model_dir.
    """

    arch_name = "fancy_mlp"

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 512,
        tanh_out_activation: bool = True,
        action_scale: float = 1.0,
        add_norm: bool = True,
        add_dropout: bool = True,
        dropout: float = 0.1,
        delta_input: bool = False,
    ):
        super().__init__(obs_dim, act_dim, hidden_dim, tanh_out_activation, action_scale)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.add_norm, self.add_dropout, self.dropout = bool(add_norm), bool(add_dropout), float(dropout)
        width = self._init_delta(delta_input)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden_dim),
            nn.LayerNorm(hidden_dim) if add_norm else nn.Identity(),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout) if add_dropout and dropout > 0 else nn.Identity(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim) if add_norm else nn.Identity(),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_dim, act_dim),
            nn.Tanh() if tanh_out_activation else nn.Identity(),
        )

    @property
    def config(self) -> dict:
        return {**super().config, "add_norm": self.add_norm, "add_dropout": self.add_dropout}

    @property
    def options(self) -> dict:
        return {"dropout": self.dropout, **({"delta_input": True} if self.delta_input else {})}


#: architecture registry: params.json["architecture"]["name"] -> class
ARCHITECTURES: dict[str, type[_InvDynBase]] = {
    MlpInvDynamic.arch_name: MlpInvDynamic,
    FancyMlpInvDynamic.arch_name: FancyMlpInvDynamic,
}


def register_architecture(cls: type[_InvDynBase]) -> type[_InvDynBase]:
    """Add an architecture (class decorator); its `arch_name` becomes loadable from model directories."""
    ARCHITECTURES[cls.arch_name] = cls
    return cls


def build_model(arch: str, config: dict, options: dict | None = None) -> _InvDynBase:
    """Instantiate `arch` from CleanDiffuser-style `config` plus our extra `options`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config, **(options or {}))


class _RunningScale(nn.Module):
    """Divides its input by the root mean square seen in training (cumulative, then a fixed constant).

    Unlike BatchNorm it never normalizes with the current batch's statistics, so a batch of one and
    eval mode behave the same; the statistics live in the state dict like any weight.
    """

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.register_buffer("sq_mean", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                n = float(x.shape[0])
                batch = x.detach().float().pow(2).mean(0)
                self.sq_mean.copy_((self.sq_mean * self.count + batch * n) / (self.count + n))
                self.count.add_(n)
        return x * torch.rsqrt(self.sq_mean + self.eps).to(x.dtype)


class _ResBlock(nn.Module):
    """Pre-norm residual block: x + Linear(GELU(Linear(LayerNorm(x))))."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@register_architecture
class ResMlpInvDynamic(_InvDynBase):
    """Residual MLP on (s, s', s' - s): invdyn's own IDM (not loadable by CleanDiffuser).

    Why the extra input: the action shows up in the *change* of state (joint accelerations), a small
    difference of two large normalized vectors; feeding s' - s rescaled to unit RMS makes it as easy to
    read as the states themselves. Residual blocks let depth help instead of hurt. `obs_noise` (training
    only, normalized units) perturbs the current state: a planner's IDM runs from states slightly off
    the data, and this teaches it to still head for s'.
    """

    arch_name = "res_mlp"

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 512,
        tanh_out_activation: bool = True,
        action_scale: float = 1.0,
        n_blocks: int = 2,
        dropout: float = 0.0,
        delta_input: bool = True,
        obs_noise: float = 0.0,
    ):
        super().__init__(obs_dim, act_dim, hidden_dim, tanh_out_activation, action_scale)
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 0:
            raise ValueError(f"n_blocks must be an integer >= 0, got {n_blocks!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not 0.0 <= float(obs_noise) < 10.0:
            raise ValueError(f"obs_noise must be in [0, 10), got {obs_noise!r}")
        self.n_blocks, self.dropout, self.delta_input = int(n_blocks), float(dropout), bool(delta_input)
        self.obs_noise = float(obs_noise)
        self.delta_scale = _RunningScale(obs_dim) if self.delta_input else None
        self.mlp = nn.Sequential(
            nn.Linear((3 if self.delta_input else 2) * obs_dim, hidden_dim),
            *[_ResBlock(hidden_dim, self.dropout) for _ in range(self.n_blocks)],
            nn.LayerNorm(hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_dim, act_dim),
            nn.Tanh() if tanh_out_activation else nn.Identity(),
        )

    @property
    def options(self) -> dict:
        return {
            "n_blocks": self.n_blocks,
            "dropout": self.dropout,
            "delta_input": self.delta_input,
            "obs_noise": self.obs_noise,
        }

    def forward(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        if self.training and self.obs_noise > 0:  # the current state a little off, as in closed loop
            obs = obs + self.obs_noise * torch.randn_like(obs)
        parts = [obs, next_obs]
        if self.delta_scale is not None:
            parts.append(self.delta_scale(next_obs - obs))
        out = self.mlp(torch.cat(parts, -1))
        if self.tanh_out_activation:
            out = out * self.action_scale
        return out
