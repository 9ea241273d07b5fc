"""`delta_input`: s' - s, normalized by the training pairs' own mean / std, as a third input. Its buffers come
from the training rows only, survive save / load / ONNX / population training, and the option off leaves a
model exactly as before."""

import dataclasses
import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
from helpers.training import assert_same_path, linear_transitions, small

import invdyn
from invdyn.model_dir import read_model_dir
from invdyn.models import FancyMlpInvDynamic, MlpInvDynamic, build_model
from invdyn.onnx_export import export_onnx
from pipeline.training.cli import main as train_main
from pipeline.training.population import shape_groups, train_population
from pipeline.training.trainer import build_net, prepare, train

DELTA = {"delta_input": True}


def delta_stats(data, normalizer, rows):
    """Mean and std of the normalized s' - s over `rows`, in float64."""
    obs = (data.obs[rows].astype(np.float64) - normalizer.mean) / normalizer.std
    nxt = (data.next_obs[rows].astype(np.float64) - normalizer.mean) / normalizer.std
    d = nxt - obs
    return d.mean(0), d.std(0)


def poisoned(data, rows):
    """The same transitions with wild next states and actions on `rows` (the observations, and so the
    normalizer, stay: only a reader of those rows' pairs would notice)."""
    nxt, act = data.next_obs.copy(), data.act.copy()
    nxt[rows] = nxt[rows] * 50 + 100
    act[rows] = -act[rows]
    return dataclasses.replace(data, next_obs=nxt, act=act)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fancy_mlp trained with delta_input on (episode split, so there are test rows)."""
    data = linear_transitions()
    out = tmp_path_factory.mktemp("delta") / "m"
    return data, train(data, small(**DELTA), out, figures=False)


def test_buffers_are_the_training_rows_statistics_and_test_rows_change_nothing(tmp_path):
    data = linear_transitions()
    prepared = prepare(data, small(**DELTA))
    net = build_net(prepared)
    mean, std = delta_stats(data, prepared.normalizer, prepared.train_idx)
    np.testing.assert_allclose(net.delta_scale.numpy(), 1 / std, rtol=1e-6)
    np.testing.assert_allclose(net.delta_shift.numpy(), -mean / std, rtol=1e-6, atol=1e-7)
    every_row = delta_stats(data, prepared.normalizer, np.arange(len(data)))
    assert not np.allclose(net.delta_scale.numpy(), 1 / every_row[1], rtol=1e-4)  # rows matter

    bad = poisoned(data, prepared.test_idx)
    bad_net = build_net(prepare(bad, small(**DELTA)))
    assert torch.equal(bad_net.delta_scale, net.delta_scale) and torch.equal(
        bad_net.delta_shift, net.delta_shift
    )
    clean = train(data, small(**DELTA), tmp_path / "clean", figures=False)
    dirty = train(bad, small(**DELTA), tmp_path / "dirty", figures=False)
    assert [r["val_mse"] for r in clean.curve] == [r["val_mse"] for r in dirty.curve]
    mine, theirs = (read_model_dir(r.model_dir).net.state_dict() for r in (clean, dirty))
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert clean.metrics["test_mse"] != dirty.metrics["test_mse"]  # the poison did reach the test rows


def test_save_load_round_trip_safetensors_and_checkpoint_only(trained, tmp_path):
    data, result = trained
    params = json.loads((result.model_dir / "params.json").read_text())
    assert params["architecture"] == {"name": "fancy_mlp", "dropout": 0.0, "delta_input": True}
    assert params["training"]["delta_input"] is True
    model = invdyn.load("delta-v0", source=result.model_dir)
    assert model.net.config["obs_dim"] * 3 == model.net.mlp[0].in_features
    assert float(model.net.delta_scale.std()) > 0  # the trainer's statistics, not the initial ones
    expected = model.predict(data.obs[:64], data.next_obs[:64])

    ckpt_only = tmp_path / "ckpt-only"
    shutil.copytree(result.model_dir, ckpt_only)
    (ckpt_only / "model.safetensors").unlink()
    p = json.loads((ckpt_only / "params.json").read_text())
    del p["weights"]["safetensors"]
    (ckpt_only / "params.json").write_text(json.dumps(p))
    again = read_model_dir(ckpt_only)
    assert torch.equal(again.net.delta_shift, model.net.delta_shift)
    np.testing.assert_array_equal(again.predict(data.obs[:64], data.next_obs[:64]), expected)

    # a planner's (B, H, obs_dim) batch gives the rows' actions in that shape
    obs, nxt = data.obs[:60].reshape(4, 15, -1), data.next_obs[:60].reshape(4, 15, -1)
    np.testing.assert_allclose(model.predict(obs, nxt).reshape(60, -1), expected[:60], rtol=0, atol=1e-6)


def test_onnxruntime_equals_predict(trained, tmp_path):
    data, result = trained
    model = read_model_dir(result.model_dir)
    export_onnx(model, tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    obs, nxt = data.obs[:300], data.next_obs[:300]
    (act,) = session.run(None, {"obs": obs, "next_obs": nxt})
    np.testing.assert_allclose(act, model.predict(obs, nxt), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [FancyMlpInvDynamic, MlpInvDynamic])
def test_option_off_leaves_keys_and_outputs_as_before(cls):
    config = dict(obs_dim=5, act_dim=2, hidden_dim=16, tanh_out_activation=True, action_scale=1.5)
    torch.manual_seed(3)
    before = cls(**config).eval()
    torch.manual_seed(3)
    off = build_model(cls.arch_name, config, {"delta_input": False}).eval()
    assert list(off.state_dict()) == list(before.state_dict())
    assert not any(k.startswith("delta") for k in off.state_dict()) and "delta_input" not in off.options
    assert off.mlp[0].in_features == 10
    obs, nxt = torch.randn(32, 5), torch.randn(32, 5)
    out = off.predict(obs, nxt)
    assert torch.equal(out, before.predict(obs, nxt))
    assert torch.equal(out, before.mlp(torch.cat([obs, nxt], -1)) * 1.5)
    on = cls(**config, delta_input=True)
    assert on.mlp[0].in_features == 15 and on.options["delta_input"] is True
    with pytest.raises(ValueError, match="delta_input must be true or false"):
        cls(**config, delta_input="yes")


def test_population_members_share_the_buffers_and_follow_their_alone_training(tmp_path, summation):
    """Actions independent of states: the impatient member stops early and leaves the stack (the eager
    step's `keep`), the others go on; each follows its alone-training."""
    data = linear_transitions(noise_actions=True, episodes=10)
    base = {"max_epochs": 6, "schedule": "none", "ema": 0.0, "lr": 1e-2, "hidden_dim": 128}
    configs = [small(**DELTA, **base, patience=1), small(**DELTA, **base, patience=100), small(**base)]
    assert shape_groups(configs) == [[0, 1], [2]]  # delta_input is part of the grouping rule
    pop = train_population(data, configs, [tmp_path / f"p{i}" for i in range(3)], figures=False)
    for i, config in enumerate(configs):
        assert_same_path(pop[i], train(data, config, tmp_path / f"a{i}", figures=False), data, config)
    assert pop[0].metrics["stopped_early"] and not pop[1].metrics["stopped_early"]
    nets = [read_model_dir(r.model_dir).net for r in pop]
    assert torch.equal(nets[0].delta_scale, nets[1].delta_scale) and not nets[2].uses_delta_stats


def test_simulated_set_ensemble_jumpy_model_and_evaluation(sim_files, tmp_path, capsys):
    from pipeline.data.sources import load_transitions
    from pipeline.evaluate import main as evaluate_main
    from pipeline.training.ensemble import train_ensemble

    path = str(sim_files["sim-hopper-random-v0"])
    hopper = load_transitions(path)
    config = small(**DELTA, max_epochs=2)
    result = train(hopper, config, tmp_path / "one", figures=False)
    assert np.isfinite(result.metrics["test_mse"]) and result.metrics["test_mse"] > 0
    assert evaluate_main([str(result.model_dir), path, "--json", "--starts", "4", "--samples", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["part"] == "test" and np.isfinite(report["tracking_drift"])  # on the test episodes
    assert report["heldout_mse"] == pytest.approx(result.metrics["test_mse"], rel=1e-4)

    jumpy = train(hopper, dataclasses.replace(config, jump=2), tmp_path / "k2", figures=False)
    model = read_model_dir(jumpy.model_dir)
    assert model.net.uses_delta_stats and model.predict(hopper.obs[:3], hopper.next_obs[:3]).shape == (3, 3)

    out, _ = train_ensemble(hopper, config, tmp_path / "ens", 2)
    ensemble = read_model_dir(out)
    scale = read_model_dir(result.model_dir).net.delta_scale  # member 0 is `config` itself, on its split
    assert ensemble.size == 2 and all(torch.equal(m.delta_scale, scale) for m in ensemble.members)
    assert ensemble.predict(hopper.obs[:5], hopper.next_obs[:5]).shape == (5, 3)


def test_search_space_axis_in_pipeline_train(sim_files, tmp_path, capsys):
    out = tmp_path / "search"
    code = train_main(
        [
            "--dataset",
            str(sim_files["sim-halfcheetah-random-v0"]),
            "--out",
            str(out),
            "--search-space",
            '{"delta_input": [false, true]}',
            "--population",
            *("--max-epochs", "1", "--hidden-dim", "32", "--threads", "1", "--quiet"),
        ]
    )
    assert code == 0, capsys.readouterr()
    summary = json.loads((out / "search.json").read_text())
    assert [s["point"] for s in summary["points"]] == [{"delta_input": False}, {"delta_input": True}]
    archs = [
        json.loads((out / name / "params.json").read_text())["architecture"]
        for name in ("delta_input-False", "delta_input-True")
    ]
    assert "delta_input" not in archs[0] and archs[1]["delta_input"] is True
    assert all(np.isfinite(s["test_mse"]) for s in summary["points"])


def test_trial_keys_of_older_jobs_stay_the_same():
    """`--resume` of a job run before the field existed still finds its trials: off is left out of the key."""
    from pipeline.training.search import trial_key

    older = {"hidden_dim": 512, "lr": 1e-3}
    assert trial_key("d", "abc", {**older, "delta_input": False}) == trial_key("d", "abc", older)
    assert trial_key("d", "abc", {**older, "delta_input": True}) != trial_key("d", "abc", older)
