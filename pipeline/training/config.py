"""What decides a training run: `TrainConfig`, one field per choice with its help (the flags of
`python -m pipeline.train` are generated from it), and the checks that refuse a config that cannot run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from invdyn.errors import InvdynError
from invdyn.models import ARCHITECTURES

SPLITS = ("episodes", "transitions")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("none", "cosine")
LOSSES = ("mse", "huber")
KEEPS = ("best", "last")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
STEPS = ("auto", "eager", "graph")


class TrainConfigError(InvdynError, ValueError):
    """A training configuration that cannot run; the message names the key and what is allowed."""


def _option(default, text: str, choices: tuple | None = None):
    """A field with its command-line help (and the values it accepts)."""
    metadata = {"help": text} if choices is None else {"help": text, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that decides a training run. Defaults: CleanDiffuser's model (FancyMlp, hidden 512,
    batch 512) trained the way bench/quality_vs_recipe.md measured to beat its recipe on every simulated
    set: no dropout, AdamW (lr 1e-3, weight decay 1e-4) with a cosine schedule over 60 epochs, an
    exponential moving average of the weights (0.999), the honest episode split and the best (averaged)
    weights kept; precision / device / threads are chosen for the machine.
    `pipeline.quality.recipe.RECIPE` pins CleanDiffuser's own recipe for comparison."""

    arch: str = _option("fancy_mlp", "architecture (invdyn.models.ARCHITECTURES key)")
    hidden_dim: int = _option(512, "width of the hidden layers")
    dropout: float = _option(0.0, "dropout of architectures that have one; 0 disables the layer")
    delta_input: bool = _option(
        False,
        "feed the net s' - s normalized by the training pairs' own mean / std as a third input (fancy_mlp, "
        "mlp; res_mlp always has its own); 0.91x test MSE on walker2d-mixed "
        "(bench/studies/quality_limits.md)",
    )
    lr: float = _option(1e-3, "learning rate")
    weight_decay: float = _option(1e-4, "weight decay")
    optimizer: str = _option("adamw", "optimizer", OPTIMIZERS)
    schedule: str = _option("cosine", "learning-rate schedule (cosine: over max_epochs)", SCHEDULES)
    loss: str = _option("mse", "training loss (evaluation is always MSE)", LOSSES)
    batch_size: int = _option(512, "transitions per step")
    max_epochs: int = _option(60, "most epochs to train")
    patience: int = _option(10, "evaluations without val MSE improvement before stopping")
    min_epochs: int | None = _option(
        None, "no early stop before this epoch (default: half of a cosine schedule, else 0)"
    )
    min_delta: float = _option(0.0, "smallest val MSE decrease that counts as an improvement")
    eval_every: int | None = _option(None, "evaluate every N steps (default: once per epoch)")
    split: str = _option(
        "episodes", "held-out set: whole episodes or random transitions (CleanDiffuser)", SPLITS
    )
    val_fraction: float = _option(
        0.15,
        "share of episodes (or transitions) in the validation part: early stopping, best weights, choices",
    )
    test_fraction: float = _option(
        0.15,
        "share of episodes (or transitions) in the test part: only reported, never chosen on; 0 = none",
    )
    keep: str = _option("best", "weights to save: best on validation or last (CleanDiffuser)", KEEPS)
    seed: int = _option(0, "seed of the initial weights and the batches (and of the split unless split_seed)")
    split_seed: int | None = _option(None, "seed of the train / validation / test split (default: seed)")
    jump: int = _option(
        1, "k: learn a_t from (s_t, s_{t+k}), pairs k steps apart within an episode; 1 = the one-step IDM"
    )
    precision: str = _option(
        "auto", "training-step precision; auto = bf16 on a CPU with native bf16, else fp32", PRECISIONS
    )
    device: str = _option("auto", "device to train on; auto = CUDA when present", DEVICES)
    step: str = _option(
        "auto", "how a step runs; auto = one CUDA graph per step on a GPU, eager on a CPU", STEPS
    )
    threads: int | None = _option(None, "CPU threads (default: the CPUs this process was given)")
    action_scale: float | None = _option(
        None, "tanh output scale (default: 1, or max |action| when actions leave [-1, 1])"
    )
    fp32_input_layer: bool = _option(True, "under bf16, keep the first layer (it sees raw s, s') in fp32")
    ema: float = _option(
        0.999, "decay of the weight average that is validated and saved; 0 = the raw weights"
    )
    target_noise: float = _option(
        0.1,
        "train on (s, s' + target_noise · ε), ε standard normal in the dataset's obs stds: the noisy plans a "
        "planner feeds; training only, the saved model is unchanged. 0.1 won the closed loop "
        "(bench/closed_loop.md); 0 = the exact targets",
    )
    obs_noise: float = _option(
        0.0, "train on (s + obs_noise · ε, s'): the current state a little off; training only"
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainConfigError(f"unknown training config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def validate(self) -> None:
        """Raise TrainConfigError naming the first bad key and what it accepts."""
        if self.arch not in ARCHITECTURES:
            raise TrainConfigError(
                f"arch={self.arch!r} is not a known architecture; known: {sorted(ARCHITECTURES)}"
            )
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise TrainConfigError(f"{f.name}={getattr(self, f.name)!r} is not one of {list(allowed)}")
        self._check_counts()
        self._check_numbers()
        for key in ("fp32_input_layer", "delta_input"):
            if not isinstance(getattr(self, key), bool):
                raise TrainConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")

    def _check_counts(self) -> None:
        for key in ("hidden_dim", "batch_size", "max_epochs", "eval_every", "threads", "jump"):
            value = getattr(self, key)
            if value is None and key in ("eval_every", "threads"):
                continue
            if not _is_int(value) or value <= 0:
                raise TrainConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("patience", "min_epochs", "seed", "split_seed"):
            value = getattr(self, key)
            if value is None and key in ("min_epochs", "split_seed"):
                continue
            if not _is_int(value) or value < 0:
                raise TrainConfigError(f"{key} must be an integer >= 0, got {value!r}")

    def _check_numbers(self) -> None:
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            raise TrainConfigError(f"ema must be in [0, 1) (0 = off), got {self.ema!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise TrainConfigError(f"dropout must be in [0.0, 1.0), got {self.dropout!r}")
        if not (_is_number(self.val_fraction) and 0.0 < self.val_fraction < 1.0):
            raise TrainConfigError(f"val_fraction must be in (0.0, 1.0), got {self.val_fraction!r}")
        if not (_is_number(self.test_fraction) and 0.0 <= self.test_fraction < 1.0):
            raise TrainConfigError(
                f"test_fraction must be in [0.0, 1.0) (0 = no test part), got {self.test_fraction!r}"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise TrainConfigError(
                f"val_fraction + test_fraction must leave rows to train on, got {self.val_fraction} + "
                f"{self.test_fraction}"
            )
        for key in ("target_noise", "obs_noise"):
            value = getattr(self, key)
            if not (_is_number(value) and not isinstance(value, bool) and 0.0 <= value < 10.0):
                raise TrainConfigError(f"{key} must be in [0, 10) dataset stds (0 = off), got {value!r}")
        for key in ("lr", "weight_decay", "min_delta"):
            value = getattr(self, key)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise TrainConfigError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.action_scale is not None and not (math.isfinite(self.action_scale) and self.action_scale > 0):
            raise TrainConfigError(
                f"action_scale must be a positive number or None, got {self.action_scale!r}"
            )

    def resolved_split_seed(self) -> int:
        """The seed the split is cut with: `split_seed`, else `seed` (members of one split may differ in
        seed)."""
        return int(self.seed if self.split_seed is None else self.split_seed)

    def resolved_min_epochs(self) -> int:
        """The first epoch early stopping may end: as set, or half of a cosine schedule (its noisy
        high-LR part)."""
        if self.min_epochs is not None:
            return int(self.min_epochs)
        return self.max_epochs // 2 if self.schedule == "cosine" else 0


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float))
