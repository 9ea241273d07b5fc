"""The IDM training loop: resident tensors, random-index batches, early stopping, best weights kept.

Plain PyTorch (no Ray, no Lightning); Ray Train and Tune only wrap `train`. Why it is fast:
observations are normalized and kept on the device once, batches are gathers by random index (no
per-item DataLoader), Adam is the fused kernel, bf16 autocast runs on CPUs with native bf16, the
loss is only read back at evaluations (no per-step device sync), and on a GPU the whole step is replayed
as one CUDA graph (`pipeline.training.steps`). Why it is honest: by default
the held-out set is whole episodes (`split="episodes"`), so neighbours of a validation transition never
appear in training, and every metric reported is computed in fp32 on the weights that are saved (the
per-epoch validation that early stopping watches runs in the training precision, as the steps do).

Units: `val_mse` / `heldout_mse` is the MSE of actions as stored (what CleanDiffuser reports as its
validation loss); `*_normalized` divides each action dimension's squared error by that dimension's
variance over the dataset (1.0 = no better than predicting the mean). Early stopping watches `val_mse`;
`patience` counts evaluations without an improvement larger than `min_delta`; no early stop happens before
`min_epochs` (default: half the epochs under a cosine schedule, else 0; measured: with AdamW at lr 1e-3 early in a cosine schedule the validation MSE of one split rose
for 10 epochs after epoch 4 and stopped training at 0.025, where the full schedule reaches 0.008).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from invdyn.errors import InvdynError
from invdyn.model_dir import save_model_dir
from invdyn.models import ARCHITECTURES, build_model
from invdyn.normalizer import GaussianNormalizer
from pipeline.data.transitions import Transitions
from pipeline.training.steps import EagerStep, GraphStep, WeightAverage

SPLITS = ("episodes", "transitions")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("none", "cosine")
LOSSES = ("mse", "huber")
KEEPS = ("best", "last")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
STEPS = ("auto", "eager", "graph")
EVAL_CHUNK = 16384  # rows per forward pass when evaluating (bounds memory, not results)


class TrainConfigError(InvdynError, ValueError):
    """A training configuration that cannot run; the message names the key and what is allowed."""


class TrainingError(InvdynError, RuntimeError):
    """Training went wrong while running (e.g. the loss became NaN); the message names the epoch."""


@dataclass
class TrainConfig:
    """Everything that decides a training run. Defaults: CleanDiffuser's model (FancyMlp, hidden 512,
    batch 512) trained the way bench/quality_vs_recipe.md measured to beat its recipe on every simulated
    set: no dropout, AdamW (lr 1e-3, weight decay 1e-4) with a cosine schedule over 60 epochs, an exponential
    moving average of the weights (0.999), the honest episode split and the best (averaged) weights kept;
    precision / device / threads are chosen for the machine.
    `pipeline.quality.report.RECIPE` pins CleanDiffuser's own recipe for comparison."""

    arch: str = "fancy_mlp"  # key of invdyn.models.ARCHITECTURES
    hidden_dim: int = 512
    dropout: float = 0.0  # for architectures with a dropout option; 0 disables the layer
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adam | adamw
    schedule: str = "cosine"  # none | cosine (over max_epochs)
    loss: str = "mse"  # mse | huber (training loss; evaluation is always MSE)
    batch_size: int = 512
    max_epochs: int = 60
    patience: int = 10  # evaluations without val_mse improving by more than min_delta
    min_epochs: int | None = None  # no early stop before this epoch; None = half of a cosine schedule, else 0
    min_delta: float = 0.0
    eval_every: int | None = None  # steps; None = once per epoch
    split: str = "episodes"  # episodes | transitions (CleanDiffuser's random 80/20 of transitions)
    val_fraction: float = 0.2
    keep: str = "best"  # best | last (CleanDiffuser keeps the last weights)
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (autocast for training steps; evaluation is fp32)
    device: str = "auto"  # auto | cpu | cuda
    step: str = (
        "auto"  # auto (graph on CUDA, eager on CPU) | eager | graph (captured as a CUDA graph on CUDA)
    )
    threads: int | None = None  # None = the CPUs this process was given (affinity / Ray's assignment)
    action_scale: float | None = None  # None = 1.0, or max |action| when actions leave [-1, 1]
    fp32_input_layer: bool = True  # under bf16, keep the first Linear (it sees raw s, s') in fp32
    ema: float = 0.999  # validate and keep an exponential moving average of the weights; 0 = the raw weights

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

        def choice(key, allowed):
            if getattr(self, key) not in allowed:
                raise TrainConfigError(f"{key}={getattr(self, key)!r} is not one of {list(allowed)}")

        def positive_int(key, value=None):
            value = getattr(self, key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise TrainConfigError(f"{key} must be a positive integer, got {value!r}")

        if self.arch not in ARCHITECTURES:
            raise TrainConfigError(
                f"arch={self.arch!r} is not a known architecture; known: {sorted(ARCHITECTURES)}"
            )
        for key, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("loss", LOSSES),
            ("split", SPLITS),
            ("keep", KEEPS),
            ("precision", PRECISIONS),
            ("device", DEVICES),
            ("step", STEPS),
        ):
            choice(key, allowed)
        for key in ("hidden_dim", "batch_size", "max_epochs"):
            positive_int(key)
        if self.eval_every is not None:
            positive_int("eval_every")
        if self.threads is not None:
            positive_int("threads")
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, (int, np.integer))
            or self.patience < 0
        ):
            raise TrainConfigError(f"patience must be an integer >= 0, got {self.patience!r}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0.0 <= self.ema < 1.0:
            raise TrainConfigError(f"ema must be in [0, 1) (0 = off), got {self.ema!r}")
        if self.min_epochs is not None and (
            isinstance(self.min_epochs, bool)
            or not isinstance(self.min_epochs, (int, np.integer))
            or self.min_epochs < 0
        ):
            raise TrainConfigError(f"min_epochs must be an integer >= 0, got {self.min_epochs!r}")

        if not (
            isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool) and self.seed >= 0
        ):
            raise TrainConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        for key, low, high in (("dropout", 0.0, 1.0), ("val_fraction", 0.0, 1.0)):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and low <= value < high) or (
                key == "val_fraction" and value == 0
            ):
                raise TrainConfigError(
                    f"{key} must be in {'(' if key == 'val_fraction' else '['}{low}, {high}), got {value!r}"
                )
        for key in ("lr", "weight_decay", "min_delta"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise TrainConfigError(f"{key} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.fp32_input_layer, bool):
            raise TrainConfigError(f"fp32_input_layer must be true or false, got {self.fp32_input_layer!r}")
        if self.action_scale is not None and not (math.isfinite(self.action_scale) and self.action_scale > 0):
            raise TrainConfigError(
                f"action_scale must be a positive number or None, got {self.action_scale!r}"
            )

    def resolved_min_epochs(self) -> int:
        """The first epoch early stopping may end: set, or half of a cosine schedule (its noisy high-LR part)."""
        if self.min_epochs is not None:
            return int(self.min_epochs)
        return self.max_epochs // 2 if self.schedule == "cosine" else 0


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict
    curve: list[dict]
    config: TrainConfig
    split: dict = field(default_factory=dict)


# ---------------------------------------------------------------- split


def split_indices(transitions_or_episodes, split: str = "episodes", val_fraction: float = 0.2, seed: int = 0):
    """`(train_idx, val_idx)`, sorted int64 arrays: a pure function of (episode ids, split, fraction, seed).

    "episodes": a seeded shuffle of the distinct episode ids; the first round(fraction * episodes) (at
    least 1, at most all but one) are held out whole. "transitions": a seeded shuffle of all rows,
    CleanDiffuser's random 80/20. Pass Transitions or the episode-id array itself.
    """
    episode = getattr(transitions_or_episodes, "episode", transitions_or_episodes)
    episode = np.asarray(episode).reshape(-1)
    n = episode.shape[0]
    if split not in SPLITS:
        raise TrainConfigError(f"split={split!r} is not one of {list(SPLITS)}")
    if not 0 < val_fraction < 1:
        raise TrainConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    if split == "transitions":
        if n < 2:
            raise TrainConfigError(f"need at least 2 transitions to split, got {n}")
        n_val = min(max(round(val_fraction * n), 1), n - 1)
        val = np.sort(rng.permutation(n)[:n_val])
        mask = np.ones(n, bool)
        mask[val] = False
        return np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)
    episodes = np.unique(episode)
    if episodes.shape[0] < 2:
        raise TrainConfigError(
            f"split='episodes' needs at least 2 episodes but the data has {episodes.shape[0]}; "
            "use split='transitions' (--split transitions) for single-episode data"
        )
    n_val = min(max(round(val_fraction * episodes.shape[0]), 1), episodes.shape[0] - 1)
    val_eps = np.sort(rng.permutation(episodes)[:n_val])
    is_val = np.isin(episode, val_eps)
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def split_digest(val_idx) -> str:
    """Short fingerprint of a held-out set, stored so a re-computed split can be checked."""
    return hashlib.sha256(np.asarray(val_idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def split_from_training(transitions, training: dict):
    """Re-create the split a model was trained with from its params.json["training"]; checks the fingerprint."""
    try:
        train_idx, val_idx = split_indices(
            transitions, training["split"], training["val_fraction"], training["seed"]
        )
    except KeyError as e:
        raise TrainConfigError(
            f"params.json 'training' lacks key {e} needed to re-create the split"
        ) from None
    info = training.get("split_info") or {}
    if info.get("val_digest") and info["val_digest"] != split_digest(val_idx):
        raise TrainConfigError(
            f"the held-out set re-created for {getattr(transitions, 'name', 'this data')!r} differs from the one the "
            "model was trained with (different data or episode ids); evaluate on the dataset it was trained on"
        )
    return train_idx, val_idx


# ---------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stop after `patience` evaluations in a row that fail to beat the best value by more than `min_delta`."""

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


# ---------------------------------------------------------------- machine choices


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, narrowed to Ray's CPU assignment inside a Ray worker."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:  # noqa: BLE001 - driver process or older Ray: keep the affinity count
            cpus = None
        if cpus:
            n = min(n, max(1, int(cpus)))
    return max(1, n)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device='cuda' but torch sees no CUDA GPU; use device='auto' or 'cpu'")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (GPU bf16, or a CPU with AVX512-BF16 / AMX via oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> bf16 on a CPU with native bf16 (measured faster at equal held-out MSE), fp32 on CUDA.

    On a GPU these small models are bound by kernel launches, not by arithmetic, and autocast only adds
    cast kernels: on an H200 the eager step trained 352k samples/s in fp32 and 270k in bf16
    (bench/train_throughput.py --device cuda)."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    return precision


def resolve_step(step: str, device: torch.device) -> str:
    """ "auto" -> "graph" on CUDA (one launch per step instead of ~100), "eager" on a CPU (fastest there)."""
    if step == "auto":
        return "graph" if device.type == "cuda" else "eager"
    return step


# ---------------------------------------------------------------- the loop


@dataclass
class _Resident:
    """The dataset on the device, observations already normalized: what every step and evaluation reads."""

    obs: torch.Tensor
    next_obs: torch.Tensor
    act: torch.Tensor
    act_var: torch.Tensor  # per-dimension action variance over the dataset (0 -> 1), for normalized MSE
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @classmethod
    def build(cls, t: Transitions, normalizer: GaussianNormalizer, train_idx, val_idx, device) -> _Resident:
        mean = torch.as_tensor(normalizer.mean, dtype=torch.float64)
        std = torch.as_tensor(normalizer.std, dtype=torch.float64)

        def normalized(a):
            return ((torch.as_tensor(np.asarray(a, dtype=np.float64)) - mean) / std).float().to(device)

        var = np.asarray(t.act, dtype=np.float64).var(0)
        return cls(
            normalized(t.obs),
            normalized(t.next_obs),
            torch.as_tensor(np.array(t.act, dtype=np.float32)).to(device),
            torch.as_tensor(np.where(var > 0, var, 1.0), device=device),
            torch.as_tensor(train_idx, device=device),
            torch.as_tensor(val_idx, device=device),
        )

    def mse(self, net, idx, chunk=EVAL_CHUNK) -> tuple[float, float]:
        """fp32 (action MSE, normalized action MSE) of `net` on rows `idx`, in eval mode, without gradients."""
        was_training = net.training
        net.eval()
        sq = torch.zeros(self.act.shape[1], dtype=torch.float64, device=self.act.device)
        with torch.inference_mode():
            for start in range(0, idx.shape[0], chunk):
                rows = idx[start : start + chunk]
                err = net(self.obs[rows], self.next_obs[rows]).float() - self.act[rows]
                sq += (err.double() ** 2).sum(0)
        net.train(was_training)
        per_dim = sq / max(int(idx.shape[0]), 1)
        return float(per_dim.mean()), float((per_dim / self.act_var).mean())

    def baseline_mse(self) -> tuple[float, float]:
        """(MSE, normalized MSE) of predicting the training split's mean action on the held-out rows."""
        mean_act = self.act[self.train_idx].double().mean(0)
        per_dim = ((self.act[self.val_idx].double() - mean_act) ** 2).mean(0)
        return float(per_dim.mean()), float((per_dim / self.act_var).mean())


def _build_model(config: TrainConfig, t: Transitions, device):
    """The network, seeded; tanh output scaled by `action_scale` (1.0 for actions in [-1, 1], like CleanDiffuser)."""
    torch.manual_seed(config.seed)
    scale = config.action_scale or (max(1.0, float(np.abs(t.act).max())) if t.act.size else 1.0)
    model_config = {
        "obs_dim": t.obs_dim,
        "act_dim": t.act_dim,
        "hidden_dim": config.hidden_dim,
        "tanh_out_activation": True,
        "action_scale": float(scale),
    }
    accepts_dropout = "dropout" in inspect.signature(ARCHITECTURES[config.arch]).parameters
    options = {"dropout": config.dropout} if accepts_dropout else {}
    try:
        return build_model(config.arch, model_config, options).to(device).train()
    except (TypeError, ValueError) as e:
        raise TrainConfigError(
            f"arch={config.arch!r} cannot be built with {model_config} {options}: {e}"
        ) from None


@contextlib.contextmanager
def _fp32_input_layer(net, device_type: str, enabled: bool):
    """Run the first Linear (the one that sees the normalized s and s') outside autocast, in fp32.

    An IDM reads the small difference s' - s out of two inputs of order 1; rounding them to bf16 (8
    significant bits) loses much of that difference. The first layer is ~6% of the FLOPs, so keeping it
    fp32 costs little; every later layer sees features, where bf16 rounding is harmless.
    """
    first = next((m for m in net.modules() if isinstance(m, torch.nn.Linear)), None)
    if not enabled or first is None:
        yield
        return
    saved = []

    def before(module, args):
        saved.append(torch.is_autocast_enabled(device_type))
        torch.set_autocast_enabled(device_type, False)

    def after(module, args, output):
        torch.set_autocast_enabled(device_type, saved.pop())

    handles = [first.register_forward_pre_hook(before), first.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _flush_denormals(device):
    """Treat subnormal floats as zero on the CPU while training (x86 FTZ/DAZ), then go back to the default.

    Real IDM data drives some activations and Adam's second moments into the subnormal range (< 1.2e-38),
    where x86 arithmetic is many times slower: on halfcheetah a bf16 step took 33% longer with them
    (bench/train_throughput.py). Values that small do not change any weight update, and the held-out MSE
    is the same either way (tests/test_trainer.py).
    """
    if device.type != "cpu" or not torch.set_flush_denormal(True):  # False: this CPU cannot
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default (it has no getter for the previous state)


def train(
    transitions: Transitions, config: TrainConfig, out_dir, *, on_eval=None, dataset_name=None
) -> TrainResult:
    """Train one IDM on `transitions`; write the kept model to `out_dir` (invdyn format) and return it.

    `on_eval(record)` is called at every evaluation with the learning-curve record (epoch, step,
    train_loss, val_mse, val_mse_normalized, best_val_mse, elapsed_s, train_time_s).
    """
    started = time.perf_counter()
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    n = len(transitions)
    if n == 0:
        raise TrainConfigError(f"dataset {transitions.name!r} has no transitions")
    if not all(np.isfinite(a).all() for a in (transitions.obs, transitions.next_obs, transitions.act)):
        raise TrainConfigError(f"dataset {transitions.name!r} contains NaN or inf in obs/next_obs/actions")
    train_idx, val_idx = split_indices(transitions, config.split, config.val_fraction, config.seed)
    if config.batch_size > train_idx.shape[0]:
        raise TrainConfigError(
            f"batch_size={config.batch_size} is larger than the training split ({train_idx.shape[0]} of {n} "
            f"transitions of {transitions.name!r}); use a smaller --batch-size"
        )
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    threads = config.threads or available_cpus()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        normalizer = GaussianNormalizer.from_data(transitions.obs)  # all observations, as CleanDiffuser
        data = _Resident.build(transitions, normalizer, train_idx, val_idx, device)
        net = _build_model(config, transitions, device)
        with _flush_denormals(device):
            net, curve, stats = _fit(net, data, config, device, precision, on_eval, started)
    finally:
        torch.set_num_threads(old_threads)

    heldout, heldout_norm = data.mse(net, data.val_idx)
    baseline, baseline_norm = data.baseline_mse()
    best = min(curve, key=lambda r: r["val_mse"])
    metrics = {
        "heldout_mse": heldout,
        "heldout_mse_normalized": heldout_norm,
        "baseline_mse": baseline,
        "baseline_mse_normalized": baseline_norm,
        "train_mse": data.mse(
            net, data.train_idx[:: math.ceil(len(data.train_idx) / max(len(data.val_idx), 1))]
        )[0],
        # ^ an estimate on every k-th training row, about as many as held out (the whole split cost ~1% of a job)
        "epochs": math.ceil(stats["steps"] / stats["steps_per_epoch"]),
        "steps": stats["steps"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "stopped_early": stats["stopped_early"],
        "train_time_s": stats["train_time_s"],
        "eval_time_s": stats["eval_time_s"],
        "wall_time_s": time.perf_counter() - started,
        "samples_per_s": stats["samples"] / stats["train_time_s"] if stats["train_time_s"] > 0 else None,
    }
    split_info = {
        "train_transitions": int(train_idx.shape[0]),
        "val_transitions": int(val_idx.shape[0]),
        "val_digest": split_digest(val_idx),
    }
    if config.split == "episodes":
        split_info["val_episodes"] = np.unique(transitions.episode[val_idx]).astype(int).tolist()
    training = {
        **config.to_dict(),
        "resolved": {
            "device": str(device),
            "precision": precision,
            "step": stats["step"],
            "cuda_graph": stats["cuda_graph"],
            "threads": threads,
            "torch": torch.__version__,
            "steps_per_epoch": stats["steps_per_epoch"],
        },
        "split_info": split_info,
    }
    name = dataset_name or transitions.name
    dataset = {
        "name": name,
        "sha256": transitions.sha256,
        "transitions": n,
        "episodes": int(np.unique(transitions.episode).shape[0]),
        "obs_dim": transitions.obs_dim,
        "act_dim": transitions.act_dim,
    }
    model_dir = save_model_dir(
        out_dir,
        net.cpu().float(),
        normalizer,
        name=name,
        dataset=dataset,
        metrics=metrics,
        training=training,
        learning_curve=curve,
    )
    return TrainResult(Path(model_dir), metrics, curve, config, split_info)


def _fit(net, data: _Resident, config: TrainConfig, device, precision: str, on_eval, started):
    """The optimization loop; returns (net holding the kept weights, learning curve, counters)."""
    n_train = int(data.train_idx.shape[0])
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = config.max_epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    stopper = EarlyStopping(config.patience, config.min_delta)
    min_epochs = config.resolved_min_epochs()
    best_state, curve = None, []
    step, samples, train_time, eval_time = 0, 0, 0.0, 0.0
    stopped = False
    fp32_input = precision == "bf16" and config.fp32_input_layer
    average = WeightAverage(net, config.ema) if config.ema else None
    validated = average.swapped if average else contextlib.nullcontext
    step_kind = resolve_step(config.step, device)
    if step_kind == "graph":
        take_step = GraphStep(net, data, config, total_steps, precision, average)
    else:
        take_step = EagerStep(net, data, config, total_steps, autocast, average)
    with _fp32_input_layer(net, device.type, fp32_input):
        while not stopped and step < total_steps:
            take_step.begin_epoch(data.train_idx[torch.randperm(n_train, device=device, generator=gen)])
            t0 = time.perf_counter()
            for k in range(steps_per_epoch):
                take_step(k)
                samples += min(config.batch_size, n_train - k * config.batch_size)
                step += 1
                if step % eval_every and step < total_steps:
                    continue
                sync()
                t_eval = time.perf_counter()
                train_time += t_eval - t0
                with validated():  # the weight average, when there is one: it is what gets kept
                    with autocast:  # validation in the training precision (bf16: ~40% cheaper than fp32);
                        record = _evaluate(  # the metrics reported below are recomputed in fp32
                            net,
                            data,
                            step,
                            steps_per_epoch,
                            take_step.loss.take_mean(),
                            stopper,
                            started,
                            train_time,
                        )
                    if record.pop("improved") or best_state is None:
                        best_state = {name: v.detach().clone() for name, v in net.state_dict().items()}
                curve.append(record)
                eval_time += time.perf_counter() - t_eval
                if on_eval is not None:
                    on_eval(dict(record))
                if stopper.should_stop and step >= min_epochs * steps_per_epoch:
                    stopped = True
                    break
                t0 = time.perf_counter()
            else:
                sync()
                train_time += time.perf_counter() - t0
    if config.keep == "best":
        net.load_state_dict(best_state)
    elif average is not None:
        with torch.no_grad():
            torch._foreach_copy_(average.raw, average.avg)
    stats = {
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "samples": samples,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "stopped_early": stopped,
        "step": step_kind,
        "cuda_graph": take_step.captured,
    }
    return net.eval(), curve, stats


def _evaluate(net, data: _Resident, step, steps_per_epoch, train_loss, stopper, started, train_time) -> dict:
    epoch = step / steps_per_epoch
    epoch = int(epoch) if float(epoch).is_integer() else round(epoch, 4)
    where = f"epoch {math.ceil(step / steps_per_epoch)} (step {step})"
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"training loss became {train_loss} in {where}; lower --lr, check the data for extreme values, "
            "or use --precision fp32"
        )
    val_mse, val_norm = data.mse(net, data.val_idx)
    if not math.isfinite(val_mse):
        raise TrainingError(f"validation MSE became {val_mse} in {where}; lower --lr")
    improved = stopper.update(val_mse, at=step)
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": train_loss,
        "val_mse": val_mse,
        "val_mse_normalized": val_norm,
        "best_val_mse": stopper.best,
        "elapsed_s": time.perf_counter() - started,
        "train_time_s": train_time,
        "improved": improved,
    }
