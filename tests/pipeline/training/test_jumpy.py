"""Jumpy IDMs (a_t = I(s_t, s_{t+k})): the k-step pairs, the name rule, training, saving and loading."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_d4rl_file
from helpers.training import linear_transitions, small

import invdyn
from invdyn.bundle import write_bundle
from invdyn.errors import ModelNotFoundError
from invdyn.settings import dataset_model_name, is_valid_name, jump_model_name, split_jump
from pipeline.data.catalog import DatasetError
from pipeline.data.sources import load_transitions
from pipeline.data.transitions import Transitions, jump_pairs
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.split import split_from_training
from pipeline.training.trainer import train


def _hand_built(data: dict, k: int) -> list[tuple]:
    """(episode, step of s_t, step of s_{t+k}) for every k-step pair inside one episode, by counting."""
    out, start = [], 0
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    for end in ends:
        for t in range(start, end + 1 - k + 1):  # rows start..end are the episode's pairs (next_obs kept)
            out.append(
                (data["observations"][t, 0], data["observations"][t, 1], data["observations"][t, 1] + k)
            )
        start = end + 1
    return out


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_k_step_pairs_equal_the_hand_built_ones_and_never_cross_an_episode(tmp_path, k):
    path = tmp_path / "rows.hdf5"
    data = write_d4rl_file(path, episodes=(5, 7, 4, 9))
    t = jump_pairs(load_transitions(str(path)), k)
    got = [(o[0], o[1], n[1]) for o, n in zip(t.obs, t.next_obs, strict=True)]
    assert got == _hand_built(data, k)
    assert (t.next_obs[:, 0] == t.obs[:, 0]).all()  # the same episode ...
    assert (t.next_obs[:, 1] == t.obs[:, 1] + k).all()  # ... k steps later
    assert t.stats["transitions"] == len(t) == sum(max(n - k + 1, 0) for n in (5, 7, 4, 9))


def test_a_gap_inside_an_episode_breaks_the_chain():
    t = linear_transitions(episodes=2, length=6)
    t.next_obs[:] = np.roll(t.obs, -1, axis=0)  # a chained file: next_obs[i] is obs[i + 1]
    t.next_obs[2] += 1.0  # row 2 no longer leads to row 3 (as when a non-finite row was dropped)
    rows = [int(np.flatnonzero((t.obs == o).all(1))[0]) for o in jump_pairs(t, 2).obs]
    # episode 0 (rows 0..5): no 2-step pair starts at row 2 (its chain breaks) or 5 (the episode ends)
    assert rows == [0, 1, 3, 4, 6, 7, 8, 9, 10]


def test_refuses_a_jump_longer_than_every_episode_and_a_jump_below_one(tmp_path):
    path = tmp_path / "short.hdf5"
    write_d4rl_file(path, episodes=(3, 4))
    t = load_transitions(str(path))
    with pytest.raises(DatasetError, match=r"no episode has 5 consecutive transitions \(the longest has 4\)"):
        jump_pairs(t, 5)
    with pytest.raises(TrainConfigError, match="jump must be a positive integer"):
        train(t, small(jump=0), tmp_path / "m")
    with pytest.raises(DatasetError, match="use a smaller --jump"):
        train(t, small(jump=5, batch_size=2), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_name_rule():
    assert jump_model_name("sim-hopper-random-v0") == "sim-hopper-random-v0"
    assert jump_model_name("sim-hopper-random-v0", 4) == "sim-hopper-random-v0@k4"
    assert jump_model_name("minari:door/expert-v0", 3) == "minari-door-expert-v0@k3"
    # the registry's form (store.model_name is invdyn- + this): MLflow reads '@' in models:/ URIs as an alias
    assert dataset_model_name("sim-hopper-random-v0@k4") == "sim-hopper-random-v0-k4"
    assert split_jump("hopper-medium-v2@k12") == ("hopper-medium-v2", 12)
    assert is_valid_name("hopper-medium-v2@k4")
    for bad in ("hopper@k1", "hopper@k0", "hopper@k04", "@k4", "../x@k4", "a@k4@k4", "a@b"):
        assert not is_valid_name(bad), bad
    with pytest.raises(ValueError, match="jump must be an integer >= 1"):
        jump_model_name("x", 0)


# ---------------------------------------------------------------- training


def test_jump_1_is_the_one_step_model_bit_for_bit(tmp_path):
    """A config written before `jump` existed (an old ledger's) and jump=1 give the same weights."""
    data = linear_transitions()
    assert jump_pairs(data, 1) is data
    old = {k: v for k, v in small(seed=3).to_dict().items() if k != "jump"}
    runs = [
        train(data, cfg, tmp_path / str(i), figures=False)
        for i, cfg in enumerate([old, small(seed=3, jump=1)])
    ]
    w = [torch.load(r.model_dir / "model.ckpt", weights_only=True)["state_dict"] for r in runs]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert runs[0].metrics["heldout_mse"] == runs[1].metrics["heldout_mse"]
    assert json.loads((runs[1].model_dir / "params.json").read_text())["jump"] == 1
    assert invdyn.read_model_dir(runs[1].model_dir).jump == 1


def _chained(episodes=12, length=40, obs_dim=4, act_dim=2, seed=0) -> Transitions:
    """s_{t+1} = s_t + B a_t: a chained dataset where (s_t, s_{t+k}) still tells a_t apart from noise."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(act_dim, obs_dim)).astype(np.float32)
    obs, act, nxt, ep = [], [], [], []
    for e in range(episodes):
        s = rng.normal(size=obs_dim).astype(np.float32)
        for _ in range(length):
            a = rng.uniform(-0.9, 0.9, size=act_dim).astype(np.float32)
            obs.append(s), act.append(a), ep.append(e)
            s = s + a @ b
            nxt.append(s)
    arr = [np.asarray(x, np.float32) for x in (obs, act, nxt)]
    return Transitions("chained-v0", *arr, np.asarray(ep, np.int64), stats={"sha256": "1" * 64})


def test_k4_model_trains_saves_records_its_jump_and_loads_by_jump(tmp_path):
    data = _chained()
    result = train(data, small(jump=4, max_epochs=2), tmp_path / "m")
    params = json.loads((result.model_dir / "params.json").read_text())
    assert params["name"] == "chained-v0@k4"
    assert params["jump"] == 4 and params["training"]["jump"] == 4
    assert params["dataset"]["transitions"] == 12 * (40 - 3)
    # the split is by episode, re-created from params.json on the same k-step pairs
    pairs = jump_pairs(data, 4)
    train_idx, val_idx, test_idx = split_from_training(pairs, params["training"])
    assert not set(pairs.episode[train_idx]) & set(pairs.episode[val_idx])
    assert len(test_idx) and not set(pairs.episode[test_idx]) & set(pairs.episode[train_idx])

    model = invdyn.load("chained-v0", jump=4, source=result.model_dir)
    assert model.name == "chained-v0@k4" and model.params["jump"] == 4
    pred = model.predict(pairs.obs[val_idx], pairs.next_obs[val_idx])
    mse = float(((pred - pairs.act[val_idx]) ** 2).mean())
    assert mse == pytest.approx(result.metrics["heldout_mse"], rel=1e-4)

    # from a bundle into the cache, then by name alone, either way of asking
    bundle = write_bundle(tmp_path / "b.zip", {"chained-v0@k4": result.model_dir})
    invdyn.fetch(bundle)
    assert invdyn.load("chained-v0", jump=4).jump == 4
    assert invdyn.load("chained-v0@k4").name == "chained-v0@k4"
    with pytest.raises(ValueError, match="is the model of jump 4, but jump=2"):
        invdyn.load("chained-v0@k4", jump=2)


def test_a_missing_jumpy_model_says_which_command_trains_it():
    with pytest.raises(ModelNotFoundError) as e:
        invdyn.load("sim-hopper-random-v0", jump=4)
    assert "pretrain_all --datasets sim-hopper-random-v0 --jumps 1,4" in str(e.value)


def test_pipeline_train_jump_flag_names_the_model(tmp_path):
    from pipeline.training.cli import main

    path = tmp_path / "rows.hdf5"
    write_d4rl_file(path, episodes=(30, 30, 30, 30))
    argv = ["--dataset", str(path), "--out", str(tmp_path / "m"), "--jump", "3", "--quiet"]
    assert (
        main([*argv, "--max-epochs", "1", "--batch-size", "8", "--hidden-dim", "16", "--threads", "1"]) == 0
    )
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["name"] == "rows@k3" and params["training"]["jump"] == 3
    assert TrainConfig().jump == 1


def test_evaluate_scores_a_jumpy_model_on_its_own_k_step_pairs(tmp_path):
    from pipeline.quality.evaluate import evaluate

    data = _chained()
    result = train(data, small(jump=3, max_epochs=1), tmp_path / "m", figures=False)
    ev = evaluate(invdyn.read_model_dir(result.model_dir), data)
    assert ev["heldout_mse"] == pytest.approx(result.metrics["heldout_mse"], rel=1e-4)
    assert ev["heldout_transitions"] == result.split["val_transitions"]
    assert ev["one_step_error"] is None and ev["tracking_drift"] is None
    assert ev["physics_reason"].startswith("jump 3: ")


# ---------------------------------------------------------------- the job


def test_job_trials_cross_datasets_with_jumps_and_keep_one_step_keys():
    from pipeline.job.config import JobConfigError
    from pipeline.job.records import PreparedDataset
    from pipeline.job.trials import make_trials, parse_jumps, with_jumps
    from pipeline.training.search import trial_key

    assert parse_jumps("4, 1,4") == [1, 4]
    for bad in ("0,1", "a", ""):
        with pytest.raises(JobConfigError, match="--jumps"):
            parse_jumps(bad)
    info = {"obs_dim": 11, "act_dim": 3, "transitions": 1000}
    ready = with_jumps({"hop-v0": PreparedDataset("hop-v0", "hop.hdf5", "abc", info, ref="REF")}, [1, 4])
    assert sorted(ready) == ["hop-v0", "hop-v0@k4"]
    jumpy = ready["hop-v0@k4"]
    assert (jumpy.jump, jumpy.spec, jumpy.ref, jumpy.sha256) == (4, "hop.hdf5", "REF", "abc")
    assert jumpy.physics_reason.startswith("jump 4") and ready["hop-v0"].physics_reason is None
    trials = {t.dataset: t for t in make_trials(ready, [{}], TrainConfig(max_epochs=5))}
    assert trials["hop-v0@k4"].train["jump"] == 4
    # a one-step trial's key is the key it had before jumps existed: --resume of an older job skips it
    before = {
        k: v for k, v in TrainConfig(max_epochs=5).to_dict().items() if k not in ("device", "threads", "jump")
    }
    assert trials["hop-v0"].key == trial_key("hop-v0", "abc", before)
    assert trials["hop-v0@k4"].key != trials["hop-v0"].key
    with pytest.raises(JobConfigError, match="use --jumps"):
        make_trials(ready, [{"jump": 2}], TrainConfig())


@pytest.mark.slow
def test_job_jumps_1_2_gives_two_models_with_their_names(sim_files, tmp_path):
    from helpers.job import HOPPER, job_env, run_job

    out = tmp_path / "out"
    args = ["--datasets", str(sim_files[HOPPER]), "--jumps", "1,2", "--no-mlflow", "--out", str(out)]
    proc = run_job([*args, "--max-epochs", "1", "--search-space", '{"hidden_dim": [32]}'], job_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {r["dataset"]: r for r in json.loads((out / "summary.json").read_text())}
    assert sorted(records) == [HOPPER, f"{HOPPER}@k2"]
    one, two = records[HOPPER], records[f"{HOPPER}@k2"]
    assert one["status"] == two["status"] == "ok" and one["key"] != two["key"]
    assert one["config"].get("jump", 1) == 1 and two["config"]["jump"] == 2
    assert Path(two["model_dir"]) == out / "models" / f"{HOPPER}-k2"  # the job folder's path-safe form
    model = invdyn.load(HOPPER, jump=2, source=two["model_dir"])
    assert model.params["jump"] == 2 and model.name == f"{HOPPER}@k2"
    # evaluated on its own 2-step pairs; the physics metrics apply to the one-step model only
    assert two["evaluation"]["part"] == "test"
    assert two["evaluation"]["heldout_mse"] == pytest.approx(two["test_mse"], rel=1e-4)
    assert two["evaluation"]["one_step_error"] is None and one["evaluation"]["one_step_error"] is not None


@pytest.mark.slow
def test_job_registers_and_exports_a_jumpy_model_under_mlflow_safe_names(sim_files, tmp_path, monkeypatch):
    from helpers.job import HOPPER, job_env, run_job

    out, bundle = tmp_path / "out", tmp_path / "b.zip"
    args = ["--datasets", str(sim_files[HOPPER]), "--jumps", "2", "--out", str(out), "--export", str(bundle)]
    env = job_env(tmp_path)
    proc = run_job([*args, "--max-epochs", "1", "--search-space", '{"hidden_dim": [32]}'], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [record] = json.loads((out / "summary.json").read_text())
    # '@' would make MLflow read models:/<name>@k2/1 as an alias: the registry has the '-k2' form
    assert record["dataset"] == f"{HOPPER}@k2"
    assert (
        record["registration"]["model_name"] == f"invdyn-{HOPPER}-k2" and record["registration"]["champion"]
    )
    assert invdyn.fetch(bundle) == [f"{HOPPER}@k2"]
    assert invdyn.load(HOPPER, jump=2).params["jump"] == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    version = invdyn.load(f"{HOPPER}@k2", source=f"models:/invdyn-{HOPPER}-k2/1")
    assert version.params["jump"] == 2
