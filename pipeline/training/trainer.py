"""The IDM training loop: resident tensors, random-index batches, early stopping, best weights kept.

Plain PyTorch (no Ray, no Lightning); Ray Train and Tune only wrap `train`. Why it is fast:
observations are normalized and kept on the device once, batches are gathers by random index (no
per-item DataLoader), Adam is the fused kernel, bf16 autocast runs on CPUs with native bf16, the
loss is only read back at evaluations (no per-step device sync), and on a GPU the whole step is replayed
as one CUDA graph (`pipeline.training.steps`). Why it is honest: by default the data is cut into whole
train / validation / test episodes (`pipeline.training.split`), so neighbours of a validation or test
transition never appear in training; validation decides everything (early stop, kept weights, and later
the search and the champion), the test part is only measured at the end (`test_*` metrics), and nothing
that decides reads a test action. Every metric reported is computed in fp32 on the weights that are saved
(the per-epoch validation that early stopping watches runs in the training precision, as the steps do).

Units: `val_mse` / `heldout_mse` is the validation MSE of actions as stored (what CleanDiffuser reports as
its validation loss; the name predates the test part), `test_mse` the same on the test episodes;
`*_normalized` divides each action dimension's squared error by that dimension's variance over the
train + validation rows (1.0 = no better than predicting the mean). Early stopping watches `val_mse`;
`patience` counts evaluations without an improvement larger than `min_delta`; no early stop happens
before `min_epochs` (default: half the epochs under a cosine schedule, else 0: early in a cosine
schedule the learning rate is high and the validation MSE noisy enough to stop a run that the rest of
the schedule would still improve a lot).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from invdyn.errors import InvdynError
from invdyn.model_dir import save_model_dir
from invdyn.models import ARCHITECTURES, build_model
from invdyn.normalizer import GaussianNormalizer
from invdyn.settings import jump_model_name
from pipeline.data.transitions import Transitions, jump_pairs
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.figures import card_figures
from pipeline.training.machine import (
    available_cpus,
    flush_denormals,
    fp32_input_layer,
    resolve_device,
    resolve_precision,
    resolve_step,
)
from pipeline.training.resident import EarlyStopping, Resident
from pipeline.training.split import checked_split, split_digest, split_record
from pipeline.training.steps import EagerStep, GraphStep, WeightAverage


class TrainingError(InvdynError, RuntimeError):
    """Training went wrong while running (e.g. the loss became NaN); the message names the epoch."""


@dataclass
class TrainResult:
    """What `train` returns (all of it is also in the model directory's params.json)."""

    model_dir: Path  # the model directory written (invdyn format)
    metrics: dict  # fp32 metrics of the kept weights, counters and timings
    curve: list[dict]  # one record per evaluation (epoch, step, train_loss, val_mse, ...)
    config: TrainConfig
    split: dict = field(default_factory=dict)  # sizes and fingerprint of the train / held-out split


def build_net(prepared: Prepared):
    """The network `prepared` trains, seeded with `config.seed`; its tanh scale never reads a test action,
    nor do its s' - s statistics (`delta_input`: set here, before the first step, from the training rows)."""
    net = _build_model(prepared.config, prepared.transitions, prepared.device, prepared.action_scale)
    if net.uses_delta_stats:
        rows = prepared.data.train_idx
        net.set_delta_stats(prepared.data.obs[rows], prepared.data.next_obs[rows])
    return net


def _build_model(config: TrainConfig, t: Transitions, device, action_scale: float | None = None):
    """The network, seeded; tanh output scaled by `config.action_scale`, else `action_scale`, else max |act|
    of `t` (1.0 for actions in [-1, 1], like CleanDiffuser). `build_net` passes the train + val rows' max."""
    torch.manual_seed(config.seed)
    if action_scale is None:
        action_scale = max(1.0, float(np.abs(t.act).max())) if t.act.size else 1.0
    scale = config.action_scale or action_scale
    model_config = {
        "obs_dim": t.obs_dim,
        "act_dim": t.act_dim,
        "hidden_dim": config.hidden_dim,
        "tanh_out_activation": True,
        "action_scale": float(scale),
    }
    accepts = inspect.signature(ARCHITECTURES[config.arch]).parameters
    options = {"dropout": config.dropout} if "dropout" in accepts else {}
    if config.delta_input:  # only when on: off leaves every architecture's own default (res_mlp's is on)
        options["delta_input"] = True
    try:
        return build_model(config.arch, model_config, options).to(device).train()
    except (TypeError, ValueError) as e:
        raise TrainConfigError(
            f"arch={config.arch!r} cannot be built with {model_config} {options}: {e}"
        ) from None


@dataclass
class Prepared:
    """A dataset made ready to train on: pairs, split, device and the resident tensors. `train` and
    `pipeline.training.population` both start here and end in `finish`, so every model directory is
    written, measured and split the same way."""

    transitions: Transitions  # the (jump) pairs trained on
    config: TrainConfig
    train_idx: np.ndarray
    val_idx: np.ndarray
    device: torch.device
    precision: str
    threads: int
    normalizer: GaussianNormalizer
    data: Resident
    test_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # reported, never chosen on
    action_scale: float = 1.0  # the tanh scale when config.action_scale is unset: from train + val actions


def prepare(transitions: Transitions, config: TrainConfig) -> Prepared:
    """Check the config and data, cut the split and put the data on the device (before any file)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    transitions = jump_pairs(transitions, config.jump)  # k = 1: the very same pairs (the object itself)
    train_idx, val_idx, test_idx = checked_split(transitions, config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    normalizer = GaussianNormalizer.from_data(transitions.obs)  # all observations, as CleanDiffuser
    data = Resident.build(transitions, normalizer, train_idx, val_idx, device, test_idx)
    threads = config.threads or available_cpus()
    fit_act = transitions.act[np.concatenate([train_idx, val_idx])]
    scale = max(1.0, float(np.abs(fit_act).max())) if fit_act.size else 1.0
    return Prepared(
        transitions, config, train_idx, val_idx, device, precision, threads, normalizer, data, test_idx, scale
    )


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(
    transitions: Transitions,
    config: TrainConfig,
    out_dir,
    *,
    on_eval=None,
    dataset_name=None,
    figures: bool = True,
    resolved_extra: dict | None = None,
) -> TrainResult:
    """Train one IDM on `transitions`; write the kept model to `out_dir` (invdyn format) and return it.

    `on_eval(record)` is called at every evaluation with the learning-curve record (epoch, step,
    train_loss, val_mse, val_mse_normalized, best_val_mse, elapsed_s, train_time_s). With `figures`, the
    model directory also holds the card's PNGs (learning curve, held-out R² per action dimension).
    `resolved_extra` joins params.json's `training.resolved` (the job records Ray's GPU ids there).
    """
    started = time.perf_counter()
    prepared = prepare(transitions, config)
    config = prepared.config
    with torch_threads(prepared.threads):
        net = build_net(prepared)
        with flush_denormals(prepared.device):
            net, curve, stats = _fit(
                net, prepared.data, config, prepared.device, prepared.precision, on_eval, started
            )
    return finish(
        prepared,
        net,
        curve,
        stats,
        out_dir,
        started=started,
        dataset_name=dataset_name,
        figures=figures,
        resolved_extra=resolved_extra,
    )


def finish(
    prepared: Prepared,
    net,
    curve: list[dict],
    stats: dict,
    out_dir,
    *,
    started: float,
    dataset_name=None,
    figures: bool = True,
    resolved_extra: dict | None = None,
) -> TrainResult:
    """Measure the kept weights in fp32 and write the model directory; `stats` are `_fit`'s counters."""
    transitions, config, data = prepared.transitions, prepared.config, prepared.data
    train_idx, val_idx, test_idx = prepared.train_idx, prepared.val_idx, prepared.test_idx
    metrics = _final_metrics(net, data, curve, stats, started)
    split = split_record(
        transitions,
        config.split,
        config.val_fraction,
        config.test_fraction,
        config.resolved_split_seed(),
        (train_idx, val_idx, test_idx),
    )
    split_info = {  # the sizes older readers look for (format 1's two-part split)
        "train_transitions": int(train_idx.shape[0]),
        "val_transitions": int(val_idx.shape[0]),
        "val_digest": split_digest(val_idx),
    }
    if config.split == "episodes":
        split_info["val_episodes"] = split["val_episode_ids"]
    resolved = {
        "device": str(prepared.device),
        "precision": prepared.precision,
        "step": stats["step"],
        "cuda_graph": stats["cuda_graph"],
        "threads": prepared.threads,
        "torch": torch.__version__,
        "steps_per_epoch": stats["steps_per_epoch"],
        **(resolved_extra or {}),
    }
    name = dataset_name or (
        jump_model_name(transitions.name, config.jump) if config.jump > 1 else transitions.name
    )
    dataset = {
        "name": name,
        "sha256": transitions.sha256,
        "transitions": len(transitions),
        "episodes": int(np.unique(transitions.episode).shape[0]),
        "obs_dim": transitions.obs_dim,
        "act_dim": transitions.act_dim,
    }
    r2 = data.heldout_r2(net)
    test_r2 = data.heldout_r2(net, data.test_idx) if len(test_idx) else None
    metrics["test_r2"] = _mean_or_none(test_r2)
    model_dir = save_model_dir(
        out_dir,
        net.cpu().float(),
        prepared.normalizer,
        name=name,
        dataset=dataset,
        metrics=metrics,
        training={**training_section(config, split), "resolved": resolved, "split_info": split_info},
        learning_curve=curve,
        extra={"heldout_per_dim": {"r2": r2}, "test_per_dim": {"r2": test_r2}, "jump": config.jump},
        files=card_figures(curve, r2, name) if figures else None,
    )
    return TrainResult(Path(model_dir), metrics, curve, config, {**split_info, **split})


def training_section(config: TrainConfig, split: dict) -> dict:
    """params.json's "training": the config, with `split` the split record (counts, test episode ids, seed,
    fractions, digests) and the config's split kind under `split_kind`."""
    return {**config.to_dict(), "split_kind": config.split, "split": split}


def _mean_or_none(values):
    finite = [v for v in values or () if v is not None]
    return float(np.mean(finite)) if finite else None


def _final_metrics(net, data: Resident, curve: list[dict], stats: dict, started: float) -> dict:
    """What params.json reports: fp32 metrics of the kept weights (`heldout_*`: validation, `test_*`: test,
    None without a test part), and where the time went."""
    heldout, heldout_norm = data.mse(net, data.val_idx)
    baseline, baseline_norm = data.baseline_mse()
    tested = len(data.test_idx) > 0
    test, test_norm = data.mse(net, data.test_idx) if tested else (None, None)
    test_base, test_base_norm = data.baseline_mse(data.test_idx) if tested else (None, None)
    best = min(curve, key=lambda r: r["val_mse"])
    # train MSE: an estimate on every k-th training row, about as many rows as are held out (the whole
    # training split would cost as much as a share of the job)
    every = math.ceil(len(data.train_idx) / max(len(data.val_idx), 1))
    return {
        "test_mse": test,
        "test_mse_normalized": test_norm,
        "test_baseline_mse": test_base,
        "test_baseline_mse_normalized": test_base_norm,
        "heldout_mse": heldout,
        "heldout_mse_normalized": heldout_norm,
        "baseline_mse": baseline,
        "baseline_mse_normalized": baseline_norm,
        "train_mse": data.mse(net, data.train_idx[::every])[0],
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


def _fit(net, data: Resident, config: TrainConfig, device, precision: str, on_eval, started):
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
    with fp32_input_layer(net, device.type, fp32_input):
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
                    with autocast:  # validation in the training precision (cheaper under bf16); the
                        record = _evaluate(  # metrics reported at the end are recomputed in fp32
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


def _evaluate(net, data: Resident, step, steps_per_epoch, train_loss, stopper, started, train_time) -> dict:
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
