"""The train / validation / test split: test episodes no choice reads (poisoning them changes no
learning-curve value and no weight), the params.json counts contract, refusals, old two-part models,
evaluate's test part, and `pipeline.train --split-seeds`."""

import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import write_d4rl_file

import invdyn
from pipeline.data.sources import load_transitions
from pipeline.quality.evaluate_cli import main as evaluate_main
from pipeline.registry.champion import protocol
from pipeline.training.cli import main as train_main
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.split import split_digest, split_from_training, split_indices, split_parts

EPISODES = (30,) * 20  # 20 episodes of 30 transitions: 14 / 3 / 3 at 70 / 15 / 15 %
FAST = ["--max-epochs", "2", "--hidden-dim", "16", "--batch-size", "32", "--threads", "1"]
FAST += ["--precision", "fp32", "--device", "cpu", "--quiet"]


def train_file(path, out, *extra) -> dict:
    assert train_main(["--dataset", str(path), "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "params.json").read_text())


def curve_values(params) -> list:
    """The learning curve without its clock readings (everything a choice could have read)."""
    timing = ("elapsed_s", "train_time_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in params["learning_curve"]]


def test_poisoned_test_actions_change_no_curve_value_and_no_weight(tmp_path):
    path = tmp_path / "clean.hdf5"
    data = write_d4rl_file(path, episodes=EPISODES, obs_dim=4, act_dim=2)
    clean = train_file(path, tmp_path / "clean")
    test_ids = clean["training"]["split"]["test_episode_ids"]
    assert len(test_ids) == 3

    # the same file but the test episodes' actions: 5x larger (outside [-1, 1], so a leak into the tanh scale
    # or into the normalized MSE's variance would move the curve) and shuffled
    rows = np.isin(np.repeat(np.arange(len(EPISODES)), EPISODES), test_ids)
    poisoned = data["actions"].copy()
    poisoned[rows] = -5.0 * poisoned[rows][::-1]
    bad = tmp_path / "poisoned.hdf5"
    write_d4rl_file(bad, episodes=EPISODES, obs_dim=4, act_dim=2, actions=poisoned)
    dirty = train_file(bad, tmp_path / "dirty")

    assert dirty["dataset"]["sha256"] != clean["dataset"]["sha256"]  # the files do differ
    assert dirty["training"]["split"]["test_episode_ids"] == test_ids
    assert curve_values(dirty) == curve_values(clean)
    assert dirty["weights"]["sha256"] == clean["weights"]["sha256"]
    a, b = invdyn.read_model_dir(tmp_path / "clean"), invdyn.read_model_dir(tmp_path / "dirty")
    for key, tensor in a.net.state_dict().items():
        assert torch.equal(tensor, b.net.state_dict()[key]), key
    for key in ("heldout_mse", "heldout_mse_normalized", "baseline_mse", "best_epoch"):
        assert dirty["metrics"][key] == clean["metrics"][key], key
    # ... while the test numbers, which read those actions, do move
    assert dirty["metrics"]["test_mse"] > 10 * clean["metrics"]["test_mse"]


def test_params_split_counts_contract(tmp_path):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=EPISODES, obs_dim=4, act_dim=2)
    params = train_file(path, tmp_path / "m", "--seed", "3")
    split, metrics = params["training"]["split"], params["metrics"]
    assert (split["train_episodes"], split["val_episodes"], split["test_episodes"]) == (14, 3, 3)
    total = split["train_episodes"] + split["val_episodes"] + split["test_episodes"]
    assert total == params["dataset"]["episodes"] == len(EPISODES)
    assert split["seed"] == 3 and (split["val_fraction"], split["test_fraction"]) == (0.15, 0.15)
    assert params["training"]["split_kind"] == "episodes"
    ids = split["test_episode_ids"]
    assert len(ids) == 3 and ids == sorted(ids) and all(0 <= i < len(EPISODES) for i in ids)
    assert not set(ids) & set(split["val_episode_ids"])
    for key in ("test_mse", "test_r2", "test_baseline_mse", "heldout_mse", "baseline_mse"):
        assert isinstance(metrics[key], float), key
    assert len(params["test_per_dim"]["r2"]) == 2
    assert metrics["test_r2"] == pytest.approx(np.mean(params["test_per_dim"]["r2"]))
    # the card leads with the test figures: a model-index (Hugging Face convention) before the title
    card = (tmp_path / "m" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    result = front["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]}["mse"] == metrics["test_mse"]
    assert card.index("| test_mse |") < card.index("| heldout_mse |")


def test_split_seed_moves_the_split_not_the_init(tmp_path):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=EPISODES, obs_dim=4, act_dim=2)
    a = train_file(path, tmp_path / "a", "--seed", "0", "--split-seed", "5")
    b = train_file(path, tmp_path / "b", "--seed", "1", "--split-seed", "5")
    assert a["training"]["split"] == b["training"]["split"]  # one split, two inits
    assert a["weights"]["sha256"] != b["weights"]["sha256"]
    # the registry's protocol follows the split, not the init seed
    assert protocol(a["training"]) == protocol(b["training"])
    c = train_file(path, tmp_path / "c", "--seed", "0")
    assert protocol(c["training"]) != protocol(a["training"])


def test_too_few_episodes_is_refused_with_the_count_and_the_fix(tmp_path, capsys):
    path = tmp_path / "two.hdf5"
    write_d4rl_file(path, episodes=(200, 200), obs_dim=4, act_dim=2)
    assert train_main(["--dataset", str(path), "--out", str(tmp_path / "m"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "has 2 episodes" in err and "at least 3" in err
    assert "--split transitions" in err and "--test-fraction 0" in err
    assert not (tmp_path / "m").exists()
    # either fix trains
    params = train_file(path, tmp_path / "t", "--split", "transitions")
    assert params["training"]["split"]["test_transitions"] == 60  # 15 % of 400 rows
    params = train_file(path, tmp_path / "z", "--test-fraction", "0")
    assert params["training"]["split"]["test_episodes"] == 0 and params["metrics"]["test_mse"] is None


def test_split_parts_cover_the_rows_once_and_are_seeded():
    episode = np.repeat(np.arange(40), 7)
    for kind in ("episodes", "transitions"):
        train, val, test = split_parts(episode, kind, 0.15, 0.15, 1)
        assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(episode)))
        again = split_parts(episode.copy(), kind, 0.15, 0.15, 1)
        assert all(np.array_equal(x, y) for x, y in zip((train, val, test), again, strict=True))
        assert not np.array_equal(split_parts(episode, kind, 0.15, 0.15, 2)[2], test)
    train, val, test = split_parts(episode, "episodes", 0.15, 0.15, 1)
    parts = [set(episode[p]) for p in (train, val, test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # whole episodes
    assert (len(parts[1]), len(parts[2])) == (6, 6)
    # test_fraction 0: exactly the two-part split of models trained before test parts
    train0, val0, test0 = split_parts(episode, "episodes", 0.2, 0.0, 4)
    assert len(test0) == 0 and all(
        np.array_equal(x, y)
        for x, y in zip((train0, val0), split_indices(episode, "episodes", 0.2, 4), strict=True)
    )
    with pytest.raises(TrainConfigError, match="val_fraction \\+ test_fraction"):
        TrainConfig(val_fraction=0.5, test_fraction=0.5).validate()


def test_split_from_training_reads_old_two_part_and_new_three_part_params(tmp_path):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=EPISODES, obs_dim=4, act_dim=2)
    t = load_transitions(str(path))
    # params.json "training" as invdyn wrote it before the test part: the config plus split_info
    old_train, old_val = split_indices(t, "episodes", 0.2, 0)
    old = {
        **{k: v for k, v in TrainConfig().to_dict().items() if k not in ("test_fraction", "split_seed")},
        "split": "episodes",
        "val_fraction": 0.2,
        "split_info": {"val_digest": split_digest(old_val)},
    }
    train, val, test = split_from_training(t, old)
    assert np.array_equal(train, old_train) and np.array_equal(val, old_val) and len(test) == 0
    with pytest.raises(TrainConfigError, match="differs from the one the model was trained with"):
        split_from_training(t, {**old, "split_info": {"val_digest": "0123456789abcdef"}})
    # a three-part model: all parts back, each checked against its digest
    params = train_file(path, tmp_path / "m")
    train, val, test = split_from_training(t, params["training"])
    split = params["training"]["split"]
    assert [split_digest(p) for p in (train, val, test)] == [
        split[f"{k}_digest"] for k in ("train", "val", "test")
    ]
    assert sorted(set(t.episode[test])) == split["test_episode_ids"]
    tampered = {**params["training"], "split": {**split, "test_digest": "0123456789abcdef"}}
    with pytest.raises(TrainConfigError, match="the test part re-created"):
        split_from_training(t, tampered)
    # the registry's protocol of an old version is the digest it was registered with
    assert protocol(old)[1] == "split=episodes val_fraction=0.2 seed=0"


def test_evaluate_json_scores_the_test_part_by_default(tmp_path, capsys):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=EPISODES, obs_dim=4, act_dim=2)
    params = train_file(path, tmp_path / "m")
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "m"), str(path), "--json", "--no-physics"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["part"] == "test" and result["heldout_episodes"] == 3
    assert result["heldout_transitions"] == params["training"]["split"]["test_transitions"]
    assert result["heldout_mse"] == pytest.approx(params["metrics"]["test_mse"], rel=1e-5)
    assert evaluate_main([str(tmp_path / "m"), str(path), "--json", "--no-physics", "--part", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["part"] == "val"
    assert result["heldout_mse"] == pytest.approx(params["metrics"]["heldout_mse"], rel=1e-5)
    # a model without a test part: val by default, and an explicit --part test is refused
    train_file(path, tmp_path / "two", "--test-fraction", "0")
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "two"), str(path), "--json", "--no-physics"]) == 0
    assert json.loads(capsys.readouterr().out)["part"] == "val"
    assert evaluate_main([str(tmp_path / "two"), str(path), "--no-physics", "--part", "test"]) == 2
    assert "without a test part" in capsys.readouterr().err


def test_train_split_seeds_writes_one_model_per_split_and_the_intervals(tmp_path, capsys):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=EPISODES, obs_dim=4, act_dim=2)
    out = tmp_path / "repeats"
    assert train_main(["--dataset", str(path), "--out", str(out), *FAST, "--split-seeds", "0,1"]) == 0
    assert "| test_mse |" in capsys.readouterr().out
    summary = json.loads((out / "splits.json").read_text())
    assert summary["split_seeds"] == [0, 1]
    ids = []
    for seed, run in zip((0, 1), summary["runs"], strict=True):
        params = json.loads((out / f"split-{seed}" / "params.json").read_text())
        assert params["training"]["split"]["seed"] == seed and params["training"]["seed"] == 0
        assert run["test_mse"] == params["metrics"]["test_mse"]
        ids.append(params["training"]["split"]["test_episode_ids"])
    assert ids[0] != ids[1]
    s = summary["summary"]["test_mse"]
    values = [r["test_mse"] for r in summary["runs"]]
    assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(values))
    assert s["std"] == pytest.approx(np.std(values, ddof=1)) and (s["min"], s["max"]) == (
        min(values),
        max(values),
    )
    assert "| test_mse |" in (out / "splits.md").read_text()
    assert train_main(["--dataset", str(path), "--out", str(out), *FAST, "--split-seeds", "0,x"]) == 2
    assert "--split-seeds takes integers" in capsys.readouterr().err


def test_hdf5_writer_keeps_given_actions(tmp_path):
    """The poisoning test's premise: write_d4rl_file writes the actions it is given."""
    acts = np.full((sum(EPISODES), 2), 0.25, np.float32)
    write_d4rl_file(tmp_path / "x.hdf5", episodes=EPISODES, obs_dim=4, act_dim=2, actions=acts)
    with h5py.File(tmp_path / "x.hdf5") as f:
        assert np.array_equal(f["actions"][:], acts)
