"""The training loop: early stopping, honest split, determinism, learning, model directory, bad configs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.float_order import assert_weights_follow, initial_weights
from helpers.training import linear_transitions, small
from hypothesis import given, settings
from hypothesis import strategies as st

import invdyn
from pipeline.data.transitions import Transitions
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.split import split_from_training, split_indices
from pipeline.training.trainer import EarlyStopping, TrainingError, train

# ---------------------------------------------------------------- early stopping


def test_early_stopping_on_planted_curve():
    curve = [1.0, 0.8, 0.9, 0.85, 0.81, 0.7, 0.6]
    stopper, stopped_at = EarlyStopping(patience=3), None
    for i, value in enumerate(curve):
        stopper.update(value, at=i)
        if stopper.should_stop:
            stopped_at = i
            break
    assert stopped_at == 4 and stopper.best == 0.8 and stopper.best_at == 1


def test_early_stopping_min_delta_needs_a_real_improvement():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert stopper.update(1.0) is True
    assert stopper.update(0.95) is False  # better, but by less than min_delta
    assert not stopper.should_stop
    assert stopper.update(0.91) is False
    assert stopper.should_stop and stopper.best == 1.0


def test_loop_stops_at_best_plus_patience_and_keeps_best_weights(tmp_path):
    data = linear_transitions(episodes=10, length=100, noise_actions=True)
    cfg = small(hidden_dim=128, dropout=0.0, lr=3e-3, max_epochs=40, patience=2, batch_size=32)
    result = train(data, cfg, tmp_path / "best")
    m, curve = result.metrics, result.curve
    vals = [r["val_mse"] for r in curve]
    best = int(np.argmin(vals))
    assert m["stopped_early"] and best < len(curve) - 1
    assert m["epochs"] == len(curve) == curve[best]["epoch"] + cfg.patience
    assert m["best_epoch"] == curve[best]["epoch"]
    assert m["heldout_mse"] == pytest.approx(vals[best], rel=1e-6)  # best weights, not the last ones
    assert m["heldout_mse"] < vals[-1]
    # recompute from the saved directory on the re-created held-out split
    model = invdyn.read_model_dir(result.model_dir)
    _, val_idx, _ = split_from_training(data, model.params["training"])
    pred = model.predict(data.obs[val_idx], data.next_obs[val_idx])
    assert float(((pred - data.act[val_idx]) ** 2).mean()) == pytest.approx(m["heldout_mse"], rel=1e-4)

    last = train(data, cfg.__class__(**{**cfg.to_dict(), "keep": "last"}), tmp_path / "last")
    assert last.metrics["heldout_mse"] == pytest.approx(last.curve[-1]["val_mse"], rel=1e-6)
    assert last.metrics["heldout_mse"] > m["heldout_mse"]


def test_zero_learning_rate_stops_after_patience(tmp_path):
    records = []
    result = train(
        linear_transitions(), small(lr=0.0, patience=2, max_epochs=10), tmp_path / "m", on_eval=records.append
    )
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records == [{k: v for k, v in r.items()} for r in result.curve]
    assert set(records[0]) >= {
        "epoch",
        "step",
        "train_loss",
        "val_mse",
        "best_val_mse",
        "elapsed_s",
        "train_time_s",
    }
    assert result.metrics["stopped_early"] and result.metrics["best_epoch"] == 1


def test_eval_every_steps(tmp_path):
    data = linear_transitions()  # 700 training rows (14 of 20 episodes) -> 11 steps per epoch at batch 64
    result = train(data, small(eval_every=5, max_epochs=2, patience=100), tmp_path / "m")
    assert [r["step"] for r in result.curve] == [5, 10, 15, 20, 22]
    assert result.curve[-1]["epoch"] == 2 and result.metrics["steps"] == 22


# ---------------------------------------------------------------- split


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=2, max_size=40),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
)
def test_episode_split_never_shares_an_episode(lengths, fraction, seed):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10_000)[: len(lengths)]
    episode = np.repeat(ids, lengths)
    train_idx, val_idx = split_indices(episode, "episodes", fraction, seed)
    assert not set(episode[train_idx]) & set(episode[val_idx])
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(episode.shape[0]))
    assert len(train_idx) and len(val_idx)
    again = split_indices(episode.copy(), "episodes", fraction, seed)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)


def test_transition_split_is_random_80_20_and_seeded():
    episode = np.repeat(np.arange(10), 100)
    train_idx, val_idx = split_indices(episode, "transitions", 0.2, 0)
    assert len(val_idx) == 200 and len(train_idx) == 800
    assert (
        len(set(episode[val_idx])) == 10
    )  # neighbours of held-out rows are in training: why it is the dishonest one
    assert not np.array_equal(split_indices(episode, "transitions", 0.2, 1)[1], val_idx)


def test_single_episode_cannot_be_split_by_episode():
    with pytest.raises(TrainConfigError, match="at least 2 episodes.*--split transitions"):
        split_indices(np.zeros(100, dtype=np.int64), "episodes", 0.2, 0)


# ---------------------------------------------------------------- determinism, learning, model dir


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_weights_on_cpu(tmp_path, precision):
    data = linear_transitions()
    runs = [
        train(data, small(seed=s, precision=precision), tmp_path / f"{i}") for i, s in enumerate([3, 3, 4])
    ]
    weights = [torch.load(r.model_dir / "model.ckpt", weights_only=True)["state_dict"] for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [r["val_mse"] for r in runs[0].curve] == [r["val_mse"] for r in runs[1].curve]
    assert not torch.equal(weights[0]["mlp.0.weight"], weights[2]["mlp.0.weight"])


def test_learns_on_simulated_halfcheetah_and_loads(sim_files, tmp_path):
    from pipeline.data.sources import load_transitions

    data = load_transitions(str(sim_files["sim-halfcheetah-random-v0"]))
    cfg = TrainConfig(hidden_dim=256, max_epochs=25, patience=3, batch_size=256, threads=1)
    result = train(data, cfg, tmp_path / "cheetah", dataset_name="sim-halfcheetah-random-v0")
    m = result.metrics
    assert m["heldout_mse"] < 0.25 * m["baseline_mse"], m
    assert m["heldout_mse_normalized"] < 0.25 * m["baseline_mse_normalized"]
    assert m["samples_per_s"] > 0 and m["train_time_s"] > 0

    params = json.loads((result.model_dir / "params.json").read_text())
    assert params["dataset"]["name"] == "sim-halfcheetah-random-v0"
    assert params["dataset"]["transitions"] == len(data) and params["dataset"]["obs_dim"] == 17
    assert params["dataset"]["sha256"] == data.sha256
    assert params["training"]["split_kind"] == "episodes" and params["training"]["split_info"]["val_episodes"]
    assert params["training"]["split"]["test_episodes"] > 0
    assert len(params["learning_curve"]) == m["epochs"]
    # all observations' statistics, like CleanDiffuser
    assert np.allclose(params["normalizers"]["state"]["mean"], data.obs.astype(np.float64).mean(0))

    model = invdyn.load("sim-halfcheetah-random-v0", source=result.model_dir)
    _, val_idx, _ = split_from_training(data, model.params["training"])
    pred = model.predict(data.obs[val_idx], data.next_obs[val_idx])
    assert float(((pred - data.act[val_idx]) ** 2).mean()) == pytest.approx(m["heldout_mse"], rel=1e-4)


def test_split_from_training_detects_other_data():
    data = linear_transitions()
    training = {**small().to_dict(), "test_fraction": 0.0, "split_info": {"val_digest": "0123456789abcdef"}}
    with pytest.raises(TrainConfigError, match="differs from the one the model was trained with"):
        split_from_training(data, training)


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_dim": 0}, "hidden_dim must be a positive integer, got 0"),
        ({"arch": "transformer"}, "arch='transformer' is not a known architecture"),
        ({"optimizer": "sgd"}, r"optimizer='sgd' is not one of \['adam', 'adamw'\]"),
        ({"batch_size": 701}, "batch_size=701 is larger than the training split \\(700 of 1000"),
        ({"val_fraction": 1.0}, "val_fraction must be in"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"lr": float("nan")}, "lr must be a finite number"),
    ],
)
def test_bad_config_fails_clearly(tmp_path, change, message):
    with pytest.raises(TrainConfigError, match=message):
        train(linear_transitions(), small(**change), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unknown_config_key():
    with pytest.raises(TrainConfigError, match=r"unknown training config key\(s\) \['hiden_dim'\]"):
        TrainConfig.from_dict({"hiden_dim": 3})
    assert TrainConfig.from_dict(TrainConfig(lr=1e-3).to_dict()) == TrainConfig(lr=1e-3)


def test_nan_loss_stops_with_the_epoch(tmp_path):
    # an absurd learning rate really overflows the weights: the loss turns inf/NaN in the first epoch
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) in epoch 1 .*lower --lr"):
        train(linear_transitions(), small(lr=1e38, dropout=0.0), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_nan_in_data_is_refused(tmp_path):
    data = linear_transitions()
    data.obs[3, 1] = np.nan
    with pytest.raises(TrainConfigError, match="synthetic-linear.*NaN"):
        train(data, small(), tmp_path / "m")


def test_adamw_cosine_huber_variant_learns(tmp_path):
    data = linear_transitions()
    cfg = small(optimizer="adamw", weight_decay=1e-4, schedule="cosine", loss="huber", lr=1e-3, max_epochs=4)
    result = train(data, cfg, tmp_path / "m")
    vals = [r["val_mse"] for r in result.curve]
    assert vals[-1] < vals[0] and result.metrics["heldout_mse"] < result.metrics["baseline_mse"]
    params = json.loads((result.model_dir / "params.json").read_text())
    assert params["training"]["optimizer"] == "adamw" and params["training"]["schedule"] == "cosine"


def test_threads_default_to_the_cpus_given():
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from pipeline.training.machine import available_cpus; print(available_cpus())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "1"


def test_bf16_keeps_the_input_layer_fp32_to_keep_accuracy(tmp_path):
    """s' - s is small next to s: rounding the inputs to bf16 costs accuracy, the fp32 first layer does
    not."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2000, 5)).astype(np.float32)
    act = rng.uniform(-0.9, 0.9, (2000, 2)).astype(np.float32)
    nxt = (obs + 0.05 * act @ rng.normal(size=(2, 5))).astype(np.float32)
    data = Transitions(
        "small-delta", obs, act, nxt, np.repeat(np.arange(20), 100), stats={"sha256": "0" * 64}
    )
    mse = {}
    for precision, fp32_in in (("fp32", True), ("bf16", False), ("bf16", True)):
        cfg = small(
            precision=precision,
            fp32_input_layer=fp32_in,
            max_epochs=30,
            lr=1e-3,
            dropout=0.0,
            patience=100,
            optimizer="adam",
            schedule="none",
            weight_decay=0.0,
            ema=0.0,
            target_noise=0.0,  # exact targets: noise of 0.1 stds would drown the 0.05 step being measured
        )
        mse[precision, fp32_in] = train(data, cfg, tmp_path / f"{precision}-{fp32_in}").metrics["heldout_mse"]
    assert mse["bf16", True] < 1.03 * mse["fp32", True], mse
    assert mse["bf16", False] > 1.05 * mse["fp32", True], mse


def test_no_early_stop_before_min_epochs_half_a_cosine_schedule_by_default(tmp_path):
    """A run that never improves stops after `patience` evaluations, but not before min_epochs."""
    cfg = small(lr=0.0, patience=2, max_epochs=10, schedule="cosine", min_epochs=None)
    assert (
        cfg.resolved_min_epochs() == 5 and small(schedule="none", min_epochs=None).resolved_min_epochs() == 0
    )
    result = train(linear_transitions(), cfg, tmp_path / "cosine")
    assert result.metrics["stopped_early"] and [r["epoch"] for r in result.curve] == [1, 2, 3, 4, 5]
    result = train(
        linear_transitions(), small(lr=0.0, patience=2, max_epochs=10, min_epochs=4), tmp_path / "m4"
    )
    assert [r["epoch"] for r in result.curve] == [1, 2, 3, 4]
    with pytest.raises(TrainConfigError, match="min_epochs"):
        small(min_epochs=-1).validate()


def test_weight_average_is_what_is_validated_and_kept(tmp_path):
    """With `ema`, the curve scores the averaged weights and the model directory holds them: the kept
    model reproduces the best val_mse, and it differs from the raw weights' run."""
    runs = {}
    for ema in (0.0, 0.99):
        r = train(linear_transitions(), small(max_epochs=4, patience=100, ema=ema), tmp_path / f"ema{ema}")
        best = min(c["val_mse"] for c in r.curve)
        assert r.metrics["heldout_mse"] == pytest.approx(best, rel=1e-6)
        runs[ema] = [c["val_mse"] for c in r.curve]
    assert runs[0.0] != runs[0.99]


def test_weight_average_update_and_swap():
    from pipeline.training.steps import WeightAverage

    net = torch.nn.Linear(3, 2)
    raw = [p.detach().clone() for p in net.parameters()]
    avg = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for _ in range(50):  # past the warm-up the decay is 0.5: the average converges to the moved weights
        avg.update()
    for a, r in zip(avg.avg, raw, strict=True):
        assert torch.allclose(a, r + 1.0, atol=1e-6)
    with torch.no_grad():
        net.weight.zero_()
    with pytest.raises(RuntimeError), avg.swapped():
        assert torch.allclose(net.weight, raw[0] + 1.0, atol=1e-6)
        raise RuntimeError("validation failed")
    assert torch.count_nonzero(net.weight) == 0  # the raw weights are back, even after an error
    with pytest.raises(TrainConfigError, match="ema"):
        TrainConfig(ema=1.0).validate()


def _subnormals_flushed() -> bool:
    """DAZ on: a subnormal input reads as zero."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 2.0) == 0.0


def test_subnormals_are_flushed_while_training_only_without_changing_results(
    sim_files, tmp_path, monkeypatch
):
    import contextlib

    import pipeline.training.trainer as trainer
    from pipeline.data.sources import load_transitions

    data = load_transitions(str(sim_files["sim-halfcheetah-random-v0"]))
    seen = []
    cfg = small(max_epochs=2, hidden_dim=128, batch_size=256)
    flushed = train(data, cfg, tmp_path / "ftz", on_eval=lambda r: seen.append(_subnormals_flushed()))
    assert seen and all(seen)  # on during the fit ...
    assert not _subnormals_flushed()  # ... and back to PyTorch's default after it
    monkeypatch.setattr(trainer, "flush_denormals", lambda device: contextlib.nullcontext())
    plain = train(data, cfg, tmp_path / "plain")
    assert flushed.metrics["heldout_mse"] == pytest.approx(plain.metrics["heldout_mse"], rel=1e-4)


# ---------------------------------------------------------------- the CUDA-graph step, run uncaptured on CPU


@pytest.mark.parametrize(
    "change",
    [
        {},  # the defaults: AdamW, cosine, weight average; 800 training rows = 12 batches of 64 and one of 32
        {"loss": "huber", "optimizer": "adam", "schedule": "none", "ema": 0.0},
        {"keep": "last", "eval_every": 5},
        {"batch_size": 100},  # no partial batch
    ],
    ids=["defaults", "huber-adam-flat", "last-evalevery", "even-batches"],
)
def test_graph_step_matches_the_eager_step(tmp_path, change):
    """The fixed-buffer step (device position, padded last batch, tensor LR from a device counter, average
    decay on the device) takes the same optimization path as the eager step: same curve and weights."""
    data = linear_transitions()
    runs = [
        train(data, small(step=step, max_epochs=5, **change), tmp_path / step) for step in ("eager", "graph")
    ]
    for key in ("val_mse", "train_loss"):
        eager, graph = ([r[key] for r in run.curve] for run in runs)
        assert graph == pytest.approx(eager, rel=1e-4), key
    assert runs[1].metrics["steps"] == runs[0].metrics["steps"] and runs[1].metrics["samples_per_s"] > 0
    weights = [torch.load(r.model_dir / "model.ckpt", weights_only=True)["state_dict"] for r in runs]
    assert_weights_follow(weights[1], weights[0], initial_weights(data, small(max_epochs=5, **change)))
    resolved = [json.loads((r.model_dir / "params.json").read_text())["training"]["resolved"] for r in runs]
    assert [r["step"] for r in resolved] == ["eager", "graph"]
    assert not any(r["cuda_graph"] for r in resolved)  # nothing is captured without CUDA


def test_graph_step_learning_rate_follows_the_cosine_schedule():
    """The LR tensor the graph step writes equals CosineAnnealingLR's at every step, and the padded rows
    of the last batch carry no weight."""
    from pipeline.training.resident import Resident
    from pipeline.training.steps import GraphStep, build_optimizer
    from pipeline.training.trainer import _build_model

    data = linear_transitions(episodes=4, length=25)
    train_idx, val_idx = split_indices(data, "episodes", 0.25, 0)
    resident = Resident.build(
        data, invdyn.GaussianNormalizer.from_data(data.obs), train_idx, val_idx, torch.device("cpu")
    )
    config = small(batch_size=32)
    net = _build_model(config, data, torch.device("cpu"))
    total = 3 * 3  # 75 rows: 3 batches per epoch, the last one 11 rows and 21 padding
    step = GraphStep(net, resident, config, total, "fp32", None)
    _, sched = build_optimizer(config, _build_model(config, data, torch.device("cpu")), total)
    assert float(step.weight.sum()) == 75 and float(step.weight[75:].sum()) == 0
    for _ in range(3):
        step.begin_epoch(resident.train_idx.flip(0))
        for k in range(3):
            step(k)
            assert float(step.lr) == pytest.approx(sched.get_last_lr()[0], rel=1e-5)
            sched.optimizer.step()
            sched.step()
        assert int(step.pos) == 96
    assert step.loss.take_mean() > 0 and step.loss.count == 0


@pytest.mark.parametrize(
    "change",
    [{}, {"loss": "huber", "optimizer": "adam", "schedule": "none"}],
    ids=["adamw-cosine", "adam-huber"],
)
def test_graph_step_never_reads_a_device_value_on_the_host(change):
    """A CUDA graph cannot capture a step that reads a tensor's value on the host (`.item()`, a bool mask,
    a float LR taken from a tensor): every op the step dispatches is recorded and none is such a read; the
    optimizer takes the tensor-LR kernel. The recorder does see such a read when there is one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.training.resident import Resident
    from pipeline.training.steps import GraphStep, WeightAverage
    from pipeline.training.trainer import _build_model

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    data = linear_transitions()
    train_idx, val_idx = split_indices(data, "episodes", 0.2, 0)
    cpu = torch.device("cpu")
    resident = Resident.build(data, invdyn.GaussianNormalizer.from_data(data.obs), train_idx, val_idx, cpu)
    config = small(**change)
    net = _build_model(config, data, cpu)
    step = GraphStep(net, resident, config, 100, "fp32", WeightAverage(net, 0.999))
    step.begin_epoch(resident.train_idx)
    step(0)  # the first step creates the optimizer state
    with Recorder() as recorder:
        step(1)
    host_reads = [
        op for op in recorder.ops if "_local_scalar_dense" in op or "nonzero" in op or "masked_select" in op
    ]
    assert host_reads == [] and any("tensor_lr" in op for op in recorder.ops), recorder.ops
    with Recorder() as recorder:
        float(step.lr)
    assert any("_local_scalar_dense" in op for op in recorder.ops)


# ---------------------------------------------------------------- training-only input noise


@pytest.mark.parametrize("step", ["eager", "graph"])
def test_input_noise_changes_the_training_not_the_saved_model(tmp_path, step):
    """target_noise / obs_noise perturb what the net is trained on; the directory it writes has the keys
    and outputs a plain model of the same weights has (CleanDiffuser's FancyMlp layout), and validation
    reads the clean pairs."""
    data = linear_transitions()
    plain = train(data, small(step=step, max_epochs=2), tmp_path / "plain", figures=False)
    noisy = train(data, small(step=step, max_epochs=2, target_noise=0.3), tmp_path / "noisy", figures=False)
    both = train(data, small(step=step, max_epochs=2, target_noise=0.3, obs_noise=0.3), tmp_path / "b")
    w = [
        torch.load(r.model_dir / "model.ckpt", weights_only=True)["state_dict"] for r in (plain, noisy, both)
    ]
    assert list(w[0]) == list(w[1]) == list(w[2])
    assert not torch.equal(w[0]["mlp.0.weight"], w[1]["mlp.0.weight"])
    assert not torch.equal(w[1]["mlp.0.weight"], w[2]["mlp.0.weight"])
    again = train(data, small(step=step, max_epochs=2, target_noise=0.3), tmp_path / "again", figures=False)
    assert torch.equal(
        torch.load(again.model_dir / "model.ckpt", weights_only=True)["state_dict"]["mlp.0.weight"],
        w[1]["mlp.0.weight"],
    )
    params = json.loads((noisy.model_dir / "params.json").read_text())
    assert params["training"]["target_noise"] == 0.3 and params["architecture"]["name"] == "fancy_mlp"
    # the recorded validation MSE is the clean pairs': what predict gives on them
    model = invdyn.read_model_dir(noisy.model_dir)
    val_idx = split_from_training(data, params["training"])[1]
    pred = model.predict(data.obs[val_idx], data.next_obs[val_idx])
    assert float(((pred - data.act[val_idx]) ** 2).mean()) == pytest.approx(
        noisy.metrics["heldout_mse"], rel=1e-4
    )


@pytest.mark.parametrize("key, value", [("target_noise", -0.1), ("obs_noise", 10.0), ("target_noise", True)])
def test_bad_input_noise_is_refused(key, value):
    with pytest.raises(TrainConfigError, match=f"{key} must be in \\[0, 10\\)"):
        small(**{key: value}).validate()
