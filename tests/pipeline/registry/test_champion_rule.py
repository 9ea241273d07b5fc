"""The champion rule on a real SQLite registry: superseded data never takes the alias, only the champion's
held-out protocol competes, a rule change re-ranks and is recorded, a promotion holds until beaten."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import invdyn
from pipeline.registry import store
from pipeline.registry.champion import RULE_HISTORY_TAG, choose_champion, promotion_tag, protocol
from pipeline.registry.register import main as register_main
from pipeline.registry.register import register_dataset, register_from_storage

DS, NAME = "sim-hopper-random-v0", "invdyn-sim-hopper-random-v0"
EPISODES = {"split": "episodes", "val_fraction": 0.2, "seed": 0}
TRANSITIONS = {"split": "transitions", "val_fraction": 0.2, "seed": 0}


def record(
    root, seed: int, mse: float, sha: str = "a", split: dict | None = None, test_mse=None, **extra
) -> dict:
    """A registration record for a small real model directory whose params.json records `split`."""
    torch.manual_seed(seed)
    net = invdyn.FancyMlpInvDynamic(5, 2, hidden_dim=16)
    normalizer = invdyn.GaussianNormalizer(np.zeros(5), np.ones(5))
    model_dir = invdyn.save_model_dir(
        Path(root) / f"model-{seed}",
        net,
        normalizer,
        name=DS,
        dataset={"name": DS, "sha256": sha * 64},
        metrics={"heldout_mse": mse, **({} if test_mse is None else {"test_mse": test_mse})},
        training={"lr": 3e-4, **(split or EPISODES)},
    )
    return {"dataset": DS, "sha256": sha * 64, "heldout_mse": mse, "model_dir": str(model_dir), **extra}


def _client(uri) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def _champion(uri) -> str:
    return str(_client(uri).get_model_version_by_alias(NAME, "champion").version)


def _tags(uri, version) -> dict:
    return _client(uri).get_model_version(NAME, str(version)).tags


@pytest.fixture
def uri(tmp_path):
    return store.default_uri(tmp_path / "job")


def test_old_data_registered_later_never_takes_the_alias(tmp_path, uri):
    assert register_dataset(uri, record(tmp_path, 1, 0.5, sha="a"))["champion"]
    new_data = register_dataset(uri, record(tmp_path, 2, 0.9, sha="b"))
    assert new_data["champion"] and "new data" in new_data["reason"]
    # a run on the old data, registered later from its job's storage: a lower MSE, on superseded data
    job = tmp_path / "old-job"
    job.mkdir()
    (job / "summary.json").write_text(json.dumps([record(job, 3, 0.1, sha="a")]))
    [late] = register_from_storage(job, uri)
    assert (late["status"], late["version"], late["champion"]) == ("registered", "3", False)
    assert "superseded data" in late["reason"] and "first registered in v1" in late["reason"]
    assert _champion(uri) == "2" and _tags(uri, 3)["champion_decision"] == late["reason"]
    # better models on the current data still take it
    assert register_dataset(uri, record(tmp_path, 4, 0.7, sha="b"))["champion"] and _champion(uri) == "4"


def test_only_the_champions_protocol_competes(tmp_path, uri):
    assert register_dataset(uri, record(tmp_path, 1, 0.5, split=EPISODES))["champion"]
    leaky = register_dataset(uri, record(tmp_path, 2, 0.1, split=TRANSITIONS))
    assert not leaky["champion"] and "protocol (split=transitions" in leaky["reason"]
    assert "differs from the champion's (split=episodes val_fraction=0.2 seed=0)" in leaky["reason"]
    tags = _tags(uri, 2)
    assert tags["protocol_desc"] == "split=transitions val_fraction=0.2 seed=0"
    assert tags["protocol"] == protocol(TRANSITIONS)[0] != _tags(uri, 1)["protocol"]
    other_seed = register_dataset(uri, record(tmp_path, 3, 0.2, split={**EPISODES, "seed": 1}))
    assert not other_seed["champion"] and "seed=1" in other_seed["reason"]
    better = register_dataset(uri, record(tmp_path, 4, 0.3, split=EPISODES))
    assert better["champion"] and "beats champion v1's 0.5" in better["reason"] and _champion(uri) == "4"


def test_three_part_members_of_one_split_compete_and_carry_test_tags(tmp_path, uri):
    """params.json's split record decides the protocol: init seeds differ, the split seed does not."""
    cut = {"kind": "episodes", "val_fraction": 0.15, "test_fraction": 0.15, "seed": 2}

    def training(init_seed, split_seed=2):
        return {"split": {**cut, "seed": split_seed}, "split_kind": "episodes", "seed": init_seed}

    assert register_dataset(uri, record(tmp_path, 1, 0.5, split=training(0), test_mse=0.6))["champion"]
    member = register_dataset(uri, record(tmp_path, 2, 0.3, split=training(1), test_mse=0.4))
    assert member["champion"] and _champion(uri) == "2"  # another init seed on the same split competes
    tags = _tags(uri, 2)
    assert tags["test_mse"] == repr(0.4) and tags["heldout_mse"] == repr(0.3)
    assert tags["protocol_desc"] == "split=episodes val_fraction=0.15 test_fraction=0.15 seed=2"
    other = register_dataset(uri, record(tmp_path, 3, 0.1, split=training(0, split_seed=3), test_mse=0.2))
    assert not other["champion"] and "seed=3" in other["reason"]  # another split: other validation episodes


def test_a_rule_change_re_ranks_and_is_recorded(tmp_path, uri):
    def rec(seed, mse, drift, metric):
        evaluation = {"heldout_mse": mse, "tracking_drift": drift, "horizon": 32}
        return record(tmp_path, seed, mse, evaluation=evaluation, champion_metric=metric, job=f"job-{seed}")

    register_dataset(uri, rec(1, 0.2, 0.9, "tracking_drift"))
    assert register_dataset(uri, rec(2, 0.5, 0.4, "tracking_drift"))["champion"]
    assert RULE_HISTORY_TAG not in _client(uri).get_registered_model(NAME).tags  # a first rule is no change
    by_mse = register_dataset(uri, rec(3, 0.3, 0.6, "heldout_mse"))
    assert not by_mse["champion"] and by_mse["champion_version"] == "1" == _champion(uri)
    assert by_mse["reason"].startswith(
        "champion rule changed from tracking_drift to heldout_mse by job job-3"
    )
    assert "does not beat champion v1's 0.2" in by_mse["reason"]
    gained = _tags(uri, 1)["champion_decision"]  # the version that gained the alias says why
    assert gained.startswith("champion rule changed") and "held-out MSE 0.2 beats champion v2's 0.5" in gained
    history = json.loads(_client(uri).get_registered_model(NAME).tags[RULE_HISTORY_TAG])
    assert [(h["from"], h["to"], h["by"]) for h in history] == [
        ("tracking_drift", "heldout_mse", "job job-3")
    ]
    # the same rule again changes nothing; the old rule back re-ranks back, recorded again
    again = register_dataset(uri, rec(3, 0.3, 0.6, "heldout_mse"))
    assert again["champion_version"] == "1" and "rule changed" not in again["reason"]
    back = register_dataset(uri, rec(4, 0.8, 0.7, "tracking_drift"))
    assert back["champion_version"] == "2" == _champion(uri)
    history = json.loads(_client(uri).get_registered_model(NAME).tags[RULE_HISTORY_TAG])
    assert [h["to"] for h in history] == ["heldout_mse", "tracking_drift"]


def test_a_promotion_holds_until_newer_data_or_a_better_version(tmp_path, uri, capsys):
    for seed, mse in ((1, 0.3), (2, 0.5)):
        register_dataset(uri, record(tmp_path, seed, mse))
    assert _champion(uri) == "1"
    assert (
        register_main(["--promote", NAME, "2", "--reason", "v1 fails in the field", "--mlflow-uri", uri]) == 0
    )
    assert "champion -> v2" in capsys.readouterr().out and _champion(uri) == "2"
    decision = _tags(uri, 2)["champion_decision"]
    assert decision.startswith("promoted by ") and "v1 fails in the field (was v1)" in decision
    promo = json.loads(_client(uri).get_registered_model(NAME).tags[promotion_tag("champion")])
    assert (
        (promo["version"], promo["after"], promo["previous"]) == ("2", "2", "1")
        and promo["by"]
        and promo["at"]
    )
    worse = register_dataset(uri, record(tmp_path, 3, 0.6))
    assert not worse["champion"] and "does not beat champion v2's 0.5" in worse["reason"]
    # v1 (0.3) is the best number in the registry, but it was registered before the promotion: out
    assert (
        "promoted by" in register_dataset(uri, record(tmp_path, 1, 0.3))["reason"] and _champion(uri) == "2"
    )
    better = register_dataset(uri, record(tmp_path, 4, 0.45))
    assert better["champion"] and "beats champion v2's 0.5" in better["reason"] and _champion(uri) == "4"
    newer = register_dataset(uri, record(tmp_path, 5, 0.9, sha="b"))
    assert newer["champion"] and "new data" in newer["reason"]
    # by dataset name too; a version that does not exist is a clear error
    assert register_main(["--promote", DS, "9", "--mlflow-uri", uri]) == 2
    assert "has no version 9" in capsys.readouterr().err and _champion(uri) == "5"


def test_promote_needs_an_existing_store(tmp_path, capsys):
    uri = store.default_uri(tmp_path / "nothing-here")
    assert register_main(["--promote", NAME, "1", "--mlflow-uri", uri]) == 2
    assert "no MLflow store" in capsys.readouterr().err


# -------------------------------------------------------------- the rule on its own (no registry)


def _v(n, mse, sha="a", config=None, **tags):
    tags = {"heldout_mse": str(mse), "dataset_sha256": sha, **tags}
    if config is not None:
        tags["config"] = json.dumps(config)
    return SimpleNamespace(version=str(n), tags=tags)


def test_first_registration_order_decides_which_data_is_current():
    # b is first registered in v2: newer than a (v1), whatever the version numbers of later a's
    assert choose_champion([_v(1, 0.5, "a"), _v(2, 0.9, "b"), _v(3, 0.1, "a")]) == "2"
    assert choose_champion([_v(1, 0.5, "a"), _v(2, 0.9, "b"), _v(3, 0.1, "a"), _v(4, 0.8, "b")]) == "4"
    # a version without a held-out MSE does not make its data current
    assert choose_champion([_v(1, 0.5, "a"), _v(2, "nan", "c")]) == "1"


def test_versions_registered_before_protocol_tags_use_their_config():
    old = _v(1, 0.5, config=EPISODES)  # no protocol tag: derived from the config tag
    leaky = _v(2, 0.1, config=TRANSITIONS)
    digest, desc = protocol(EPISODES)
    tagged = _v(3, 0.4, protocol=digest, protocol_desc=desc)
    assert choose_champion([old, leaky], anchor="1") == "1"
    assert choose_champion([old, leaky, tagged], anchor="1") == "3"
    assert protocol({"lr": 1e-3}) == ("", protocol({})[1])  # no split recorded: its own group
