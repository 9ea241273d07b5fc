"""Ensembles: one directory of K members round-trips (save, bundle, load), predicts their mean and spread,
scores real pairs above perturbed ones, and refuses members that do not belong together."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import invdyn
from invdyn.ensemble import EnsembleIDM
from invdyn.errors import ChecksumError, FormatError, InvdynError, ShapeError
from pipeline.training.ensemble import auroc, measure, spearman, write_ensemble

NORMALIZER = invdyn.GaussianNormalizer(np.linspace(-1, 1, 5), np.linspace(0.5, 2.0, 5))


def member_dir(path, seed, *, obs_dim=5, normalizer=NORMALIZER):
    torch.manual_seed(seed)
    net = invdyn.FancyMlpInvDynamic(obs_dim, 2, hidden_dim=16)
    return invdyn.save_model_dir(
        path,
        net,
        normalizer,
        name="toy-v0",
        dataset={"name": "toy-v0", "sha256": "ab" * 32},
        metrics={"heldout_mse": 0.1 + seed},
        training={"seed": seed},
    )


@pytest.fixture
def members(tmp_path):
    return [member_dir(tmp_path / f"m{i}", seed=i) for i in range(3)]


def test_predict_is_the_members_mean_and_std_their_spread(tmp_path, members):
    ens = invdyn.read_model_dir(write_ensemble(tmp_path / "toy-v0", members))
    assert isinstance(ens, EnsembleIDM) and ens.size == 3
    obs = np.random.default_rng(0).normal(size=(4, 7, 5)).astype(np.float32)
    nxt = obs + 0.1
    singles = np.stack([invdyn.read_model_dir(d).predict(obs, nxt) for d in members])
    mean, std = ens.predict(obs, nxt, return_std=True)
    np.testing.assert_allclose(ens.predict(obs, nxt), singles.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, singles.std(0), atol=1e-6)
    assert mean.shape == std.shape == (4, 7, 2) and (std > 0).all()
    assert ens.feasibility(obs, nxt).shape == (4, 7)
    t_mean, t_std = ens.predict(torch.as_tensor(obs), torch.as_tensor(nxt), return_std=True)
    np.testing.assert_allclose(t_std.numpy(), std, atol=1e-6)
    assert "## Ensemble" in ens.card and "member-2.safetensors" in ens.card


def test_identical_members_have_zero_spread(tmp_path, members):
    twin = tmp_path / "twin"
    shutil.copytree(members[0], twin)
    ens = invdyn.read_model_dir(write_ensemble(tmp_path / "toy-v0", [members[0], twin]))
    obs = np.ones((3, 5), np.float32)
    _, std = ens.predict(obs, obs * 2, return_std=True)
    assert np.all(std == 0)
    assert np.all(ens.feasibility(obs, obs * 2) == 0)


def test_round_trip_through_a_bundle_and_clean_diffuser_reads_member_0(tmp_path, members):
    ens_dir = write_ensemble(tmp_path / "toy-v0", members)
    zip_path = invdyn.write_bundle(tmp_path / "b.zip", [ens_dir])
    loaded = invdyn.load("toy-v0", source=str(zip_path))
    assert isinstance(loaded, EnsembleIDM) and loaded.size == 3
    obs = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.predict(obs, obs), invdyn.read_model_dir(ens_dir).predict(obs, obs), atol=1e-7
    )
    # model.ckpt (what CleanDiffuser's from_pretrained reads) holds member 0's weights
    ckpt = torch.load(ens_dir / "model.ckpt", weights_only=True)["state_dict"]
    first = invdyn.read_model_dir(members[0]).net.state_dict()
    assert all(torch.equal(ckpt[k], first[k]) for k in first)


def test_a_tampered_member_is_refused_before_parsing(tmp_path, members):
    ens_dir = write_ensemble(tmp_path / "toy-v0", members)
    data = bytearray((ens_dir / "member-1.safetensors").read_bytes())
    data[-1] ^= 1
    (ens_dir / "member-1.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="member-1.safetensors"):
        invdyn.read_model_dir(ens_dir)


def test_mismatched_members_are_refused(tmp_path, members):
    wide = member_dir(
        tmp_path / "wide", 5, obs_dim=6, normalizer=invdyn.GaussianNormalizer(np.zeros(6), np.ones(6))
    )
    with pytest.raises(ShapeError, match="obs_dim"):
        write_ensemble(tmp_path / "e1", [members[0], wide])
    other = member_dir(tmp_path / "other", 6, normalizer=invdyn.GaussianNormalizer(np.zeros(5), np.ones(5)))
    with pytest.raises(FormatError, match="normalizer"):
        write_ensemble(tmp_path / "e2", [members[0], other])
    with pytest.raises(FormatError, match="at least 2"):
        write_ensemble(tmp_path / "e3", [members[0]])
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_a_malformed_one_step_model_is_refused(tmp_path, members):
    import json

    ens_dir = write_ensemble(tmp_path / "toy-v0", members)
    params = json.loads((ens_dir / "params.json").read_text())
    params["ensemble"]["dynamics"] = {"weights": [[1.0]], "precision": [[1.0]]}
    (ens_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError, match="ensemble.dynamics"):
        invdyn.read_model_dir(ens_dir)


def test_without_an_error_model_uncertainty_is_the_spread(tmp_path, members):
    ens = invdyn.read_model_dir(write_ensemble(tmp_path / "toy-v0", members))  # written without data
    obs = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    _, spread = ens.predict(obs, obs * 0.5, return_std=True)
    assert ens.error_model is None
    np.testing.assert_array_equal(ens.uncertainty(obs, obs * 0.5), spread)


def test_a_single_model_says_feasibility_needs_an_ensemble(members):
    single = invdyn.read_model_dir(members[0])
    obs = np.zeros((2, 5), np.float32)
    with pytest.raises(InvdynError, match="needs an ensemble"):
        single.feasibility(obs, obs)
    with pytest.raises(InvdynError, match="needs an ensemble"):
        single.predict(obs, obs, return_std=True)


def test_rank_statistics_match_their_definitions():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0 and auroc([1, 1], [1, 1]) == 0.5
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def trained_ensemble(tmp_path_factory, sim_files):
    """(its directory, the data file): 2 members trained by `pipeline.train --ensemble 2`."""
    from pipeline.training.cli import main

    data = str(sim_files["sim-hopper-random-v0"])
    out = tmp_path_factory.mktemp("trained") / "ens"
    args = ["--dataset", data, "--out", str(out), "--ensemble", "2", "--quiet"]
    assert main([*args, "--max-epochs", "4", "--hidden-dim", "64", "--batch-size", "256"]) == 0
    return out, data


def test_train_cli_writes_a_loadable_ensemble_that_spots_perturbed_pairs(tmp_path, trained_ensemble):
    from pipeline.data.sources import load_transitions
    from pipeline.training.cli import main
    from pipeline.training.split import split_from_training

    out, data = trained_ensemble
    ens = invdyn.read_model_dir(out)
    assert isinstance(ens, EnsembleIDM) and ens.size == 2
    assert [m["seed"] for m in ens.params["ensemble"]["members"]] == [0, 1]
    assert len(ens.params["ensemble"]["spread_ref"]) == ens.act_dim
    t = load_transitions(data)
    _, val, test = split_from_training(t, ens.params["training"])
    stats = measure(ens, t, val)
    assert min(stats["auroc_noise_5pct"], stats["auroc_other_step"]) > 0.95, stats
    # the members differ in initial weights and batches, not in their split: both left the same test
    # episodes out, so the card's figures are measured on episodes no member saw
    assert ens.params["training"]["split"]["seed"] == 0
    measured = ens.params["uncertainty"]
    assert measured["test_transitions"] == len(test) > 0 and "test episodes" in measured["protocol"]
    assert measured == {**measure(ens, t, test), "protocol": measured["protocol"]}
    assert "Uncertainty" in ens.card
    assert len(ens.params["ensemble"]["dynamics"]["precision"]) == ens.obs_dim
    feas = ens.feasibility(torch.as_tensor(t.obs[val[:8]]), torch.as_tensor(t.next_obs[val[:8]]))
    assert isinstance(feas, torch.Tensor) and feas.shape == (8,)
    assert not list(out.parent.glob(".ens.members-*"))  # the members' work folder is gone
    # the error model: fitted on the validation pairs, it widens the spread into the predicted error std
    fitted = ens.params["ensemble"]["error_model"]
    assert ens.error_model is not None and fitted["rows"] == len(val) and fitted["epochs"] >= 1
    unc = ens.uncertainty(t.obs[test], t.next_obs[test])
    _, spread = ens.predict(t.obs[test], t.next_obs[test], return_std=True)
    assert unc.shape == spread.shape == (len(test), ens.act_dim) and np.all(unc > spread)
    assert -1 <= measured["uncertainty_error_spearman"] <= 1
    t_unc = ens.uncertainty(torch.as_tensor(t.obs[test[:4]]), torch.as_tensor(t.next_obs[test[:4]]))
    np.testing.assert_allclose(t_unc.numpy(), unc[:4], rtol=1e-5)
    assert main(["--dataset", "no-such-v0", "--out", str(tmp_path / "e0"), "--ensemble", "0"]) == 2


def _recalibrated_sha(src, dst, t, rows) -> str:
    from pipeline.training.ensemble import calibrate

    shutil.copytree(src, dst)
    return calibrate(dst, t, *rows)["error_model"]["sha256"]


def test_the_error_model_reads_validation_pairs_only_and_is_checked(tmp_path, trained_ensemble):
    import dataclasses

    from pipeline.data.sources import load_transitions
    from pipeline.training.split import split_from_training

    out, data = trained_ensemble
    t = load_transitions(data)
    train, val, test = split_from_training(t, invdyn.read_model_dir(out).params["training"])
    same = _recalibrated_sha(out, tmp_path / "same", t, (train, val))
    assert same == invdyn.read_model_dir(out).params["ensemble"]["error_model"]["sha256"]  # seeded fit

    def poisoned(rows):
        act = t.act.copy()
        act[rows] = -act[rows]
        return dataclasses.replace(t, act=act)

    assert _recalibrated_sha(out, tmp_path / "test-poisoned", poisoned(test), (train, val)) == same
    assert _recalibrated_sha(out, tmp_path / "val-poisoned", poisoned(val), (train, val)) != same
    broken = tmp_path / "same" / "error_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-1] + bytes([broken.read_bytes()[-1] ^ 1]))
    with pytest.raises(ChecksumError, match="error_model.safetensors"):
        invdyn.read_model_dir(tmp_path / "same")


def test_the_job_takes_the_selected_trial_then_the_next_best_by_the_ranking_rule():
    from pipeline.job.records import TrialResult
    from pipeline.job.selection import ensemble_members

    entries = [TrialResult(k, "d", "s", {}, heldout_mse=m) for k, m in [("a", 0.3), ("b", 0.1), ("c", 0.2)]]
    entries.append(TrialResult("d", "d", "s", {}, heldout_mse=float("nan")))  # no finite metric: never
    assert [e.key for e in ensemble_members(entries, entries[0], 3)] == ["a", "b", "c"]
    assert [e.key for e in ensemble_members(entries, entries[1], 9)] == ["b", "c", "a"]


@pytest.mark.slow
def test_pretrain_all_ensemble_writes_one_ensemble_per_dataset(sim_files, tmp_path):
    import json

    from helpers.job import HOPPER, job_env, run_job

    out = tmp_path / "out"
    args = ["--datasets", str(sim_files[HOPPER]), "--search-space", '{"seed": [0, 1, 2]}', "--ensemble", "2"]
    args += ["--max-epochs", "2", "--no-mlflow", "--no-evaluate", "--out", str(out)]
    proc = run_job(args, job_env(tmp_path))
    assert proc.returncode == 0
    [rec] = json.loads((out / "summary.json").read_text())
    ens = invdyn.read_model_dir(rec["model_dir"])
    assert isinstance(ens, EnsembleIDM) and ens.size == 2 and ens.dynamics is not None
    assert rec["ensemble"][0]["key"] == rec["key"] and len({m["key"] for m in rec["ensemble"]}) == 2
    assert sorted(m["seed"] for m in ens.params["ensemble"]["members"]) == sorted(
        m["config"]["seed"] for m in rec["ensemble"]
    )
    # a searched seed never moves the split, so the members share one and the ensemble is measured on
    # test episodes none of them trained on
    assert {m["config"]["split_seed"] for m in rec["ensemble"]} == {0}
    split = ens.params["training"]["split"]
    assert ens.params["uncertainty"]["test_transitions"] == split["test_transitions"] > 0
