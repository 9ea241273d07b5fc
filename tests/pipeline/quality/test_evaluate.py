"""pipeline.quality.evaluate: a trained IDM beats the mean action in real MuJoCo; the CLI contract; clear
errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import invdyn
from pipeline.data.sources import load_transitions
from pipeline.quality.evaluate import EvaluationError, attach_evaluation, evaluate
from pipeline.quality.metrics import evaluation_tags
from pipeline.training.trainer import TrainConfig, train

QUICK = {
    "hidden_dim": 128,
    "dropout": 0.0,
    "lr": 1e-3,
    "batch_size": 256,
    "max_epochs": 8,
    "patience": 8,
    "seed": 0,
    "threads": 1,
}


@pytest.fixture(scope="module")
def cheetah(sim_files):
    return load_transitions(str(sim_files["sim-halfcheetah-random-v0"]))


@pytest.fixture(scope="module")
def trained(cheetah, tmp_path_factory):
    """A small model trained for a few epochs on simulated HalfCheetah (episode split)."""
    out = tmp_path_factory.mktemp("model") / "sim-halfcheetah-random-v0"
    return train(cheetah, TrainConfig(**QUICK), out).model_dir


@pytest.fixture(scope="module")
def result(trained, cheetah):
    return evaluate(
        invdyn.read_model_dir(trained), cheetah, horizon=32, one_step_samples=400, tracking_starts=16
    )


def test_trained_model_beats_the_mean_action_in_mujoco(result, trained):
    params = invdyn.read_model_dir(trained).params
    # scored on exactly the held-out episodes the trainer kept out, with the trainer's own metric
    assert result["part"] == "val" and result["heldout"].startswith("validation part")
    assert result["heldout_episodes"] == len(params["training"]["split_info"]["val_episodes"])
    assert result["heldout_mse"] == pytest.approx(params["metrics"]["heldout_mse"], rel=1e-4)
    assert result["heldout_mse"] < 0.3 * result["baseline_mse"]
    # physics: far below the mean action, far above the floor (which is floating-point exact)
    assert result["physics_reason"] is None
    assert result["one_step_floor"] < 1e-8 < result["one_step_error"] < 0.5 * result["one_step_baseline"]
    assert result["tracking_floor"] < 1e-8 < result["tracking_drift"] < 0.5 * result["tracking_baseline"]
    assert len(result["drift_per_step"]) == 32 and result["drift_per_step"][-1] == result["tracking_drift"]
    assert len(result["per_dim_r2"]) == 6 and min(result["per_dim_r2"]) > 0.3


def test_evaluate_json_contract_from_the_command_line(trained, sim_files):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [
        sys.executable,
        "-W",
        "error",  # a warning anywhere on the way fails the command
        "-m",
        "pipeline.evaluate",
        str(trained),
        str(sim_files["sim-halfcheetah-random-v0"]),
        "--json",
        "--starts",
        "4",
        "--samples",
        "100",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert out["part"] == "test" and out["heldout"].startswith("test part")  # the command's default
    for key in (
        "heldout_mse",
        "baseline_mse",
        "one_step_error",
        "one_step_baseline",
        "one_step_floor",
        "tracking_drift",
        "tracking_baseline",
    ):
        assert isinstance(out[key], float), key
    assert out["horizon"] == 32 and len(out["drift_per_step"]) == 32
    assert out["heldout_mse_normalized"] < out["baseline_mse_normalized"]


def test_dims_mismatch_is_a_clear_error(trained, sim_files):
    hopper = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    with pytest.raises(
        EvaluationError, match=r"obs_dim=17, act_dim=6 .*'sim-hopper-random-v0' has obs_dim=11, act_dim=3"
    ):
        evaluate(invdyn.read_model_dir(trained), hopper)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            str(trained),
            str(sim_files["sim-hopper-random-v0"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "obs_dim=11" in proc.stderr and "obs_dim=17" in proc.stderr


def test_dataset_without_simulator_state_gives_null_physics(d4rl_file):
    path, _ = d4rl_file("plain.hdf5", episodes=(40, 50, 45, 60, 38), obs_dim=4, act_dim=2)
    t = load_transitions(str(path))
    net = invdyn.FancyMlpInvDynamic(4, 2, 16)
    model_dir = invdyn.save_model_dir(path.parent / "m", net, invdyn.GaussianNormalizer.from_data(t.obs))
    r = evaluate(invdyn.read_model_dir(model_dir), t)
    assert r["heldout"].startswith("all rows")  # no recorded split: every row, and it says so
    assert r["heldout_transitions"] == len(t) and r["baseline_mse"] > 0
    assert r["one_step_error"] is None and r["tracking_drift"] is None
    assert "infos/qpos" in r["physics_reason"]
    json.dumps(r, allow_nan=False)  # null, not NaN


def test_attach_evaluation_updates_params_and_card_atomically(trained, result, tmp_path):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(trained, model_dir)
    attach_evaluation(model_dir, result)
    loaded = invdyn.read_model_dir(model_dir)  # the weights checksum still verifies
    ev = loaded.params["evaluation"]
    assert ev["tracking_drift"] == result["tracking_drift"] and ev["horizon"] == 32
    assert "## Evaluation" in loaded.card and "tracking drift" in loaded.card
    # the R² figure is redrawn from the evaluation; both figures stay linked
    assert (model_dir / "per_dim_r2.png").read_bytes()[:4] == b"\x89PNG"
    assert "(learning_curve.png)" in loaded.card and "(per_dim_r2.png)" in loaded.card
    assert (model_dir / "learning_curve.png").read_bytes() == (trained / "learning_curve.png").read_bytes()
    assert loaded.params["metrics"] == invdyn.read_model_dir(trained).params["metrics"]
    obs = np.zeros((2, 17), np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, obs), invdyn.read_model_dir(trained).predict(obs, obs))
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["m"]  # no temp dirs left behind
    tags = evaluation_tags(result)
    assert tags["eval.tracking_drift"] == result["tracking_drift"] and all(
        isinstance(v, float) for v in tags.values()
    )


def test_bad_horizon_is_refused(trained, cheetah):
    with pytest.raises(EvaluationError, match="horizon"):
        evaluate(invdyn.read_model_dir(trained), cheetah, horizon=0)


def test_res_mlp_trains_saves_and_evaluates(cheetah, tmp_path):
    """invdyn's residual architecture goes through the trainer, the model format and the evaluation."""
    config = TrainConfig(**{**QUICK, "arch": "res_mlp", "max_epochs": 2, "patience": 2})
    model = invdyn.read_model_dir(train(cheetah, config, tmp_path / "res").model_dir)
    arch = model.params["architecture"]
    assert arch["name"] == "res_mlp" and arch["n_blocks"] == 2 and arch["delta_input"] is True
    scale = model.net.delta_scale
    delta = model.normalizer.normalize(cheetah.next_obs) - model.normalizer.normalize(cheetah.obs)
    assert scale.count.item() > len(cheetah)  # learned from 2 epochs of training rows, not the init
    # the scale sees what training feeds: s' + target_noise · ε, so its square mean gains target_noise²
    expected = (delta**2).mean(0) + config.target_noise**2
    np.testing.assert_allclose(scale.sq_mean.numpy(), expected, rtol=0.25)
    obs, nxt = cheetah.obs[:5], cheetah.next_obs[:5]
    one_by_one = np.concatenate([model.predict(obs[i : i + 1], nxt[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, model.predict(obs, nxt), atol=1e-6)  # no batch statistics at eval
    r = evaluate(model, cheetah, horizon=4, one_step_samples=50, tracking_starts=2)
    assert r["heldout_mse"] < r["baseline_mse"] and r["one_step_error"] < r["one_step_baseline"]


def test_a_cleandiffuser_checkpoint_is_evaluated_on_all_rows(sim_files):
    """A model CleanDiffuser itself saved (no split recorded) is scored on every row, physics included."""
    from helpers.models import CD_DIR

    from pipeline.quality.evaluate import load_model

    hopper = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    r = evaluate(load_model(str(CD_DIR)), hopper, horizon=4, one_step_samples=50, tracking_starts=2)
    assert r["heldout"].startswith("all rows") and r["heldout_transitions"] == len(hopper)
    assert r["physics_reason"] is None and r["one_step_floor"] < 1e-8 < r["one_step_error"]


def test_evaluation_is_logged_to_the_registered_champion(
    trained, cheetah, sim_files, tmp_path, monkeypatch, capsys
):
    """`evaluate models:/...@champion --log-to-registry` puts the headline metrics on that registered
    version."""
    from mlflow import MlflowClient

    from pipeline.evaluate import main  # the command: --log-to-registry is wired there
    from pipeline.registry import store
    from pipeline.registry.register import register_dataset

    uri = store.default_uri(tmp_path / "job")
    params = invdyn.read_model_dir(trained).params
    record = {
        "dataset": "sim-halfcheetah-random-v0",
        "sha256": cheetah.sha256,
        "model_dir": str(trained),
        "heldout_mse": params["metrics"]["heldout_mse"],
        "baseline_mse": params["metrics"]["baseline_mse"],
    }
    registered = register_dataset(uri, record)
    assert registered["champion"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_uri = f"models:/{registered['model_name']}@champion"
    args = [
        model_uri,
        str(sim_files["sim-halfcheetah-random-v0"]),
        "--json",
        "--starts",
        "4",
        "--samples",
        "100",
    ]
    assert main([*args, "--log-to-registry"]) == 0
    result = json.loads(capsys.readouterr().out)
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(
        registered["model_name"], registered["version"]
    )
    assert float(version.tags["eval.tracking_drift"]) == pytest.approx(result["tracking_drift"])
    assert float(version.tags["eval.heldout_mse"]) == pytest.approx(result["heldout_mse"])
    # a version that does not exist is a clear error, not a traceback
    assert main([f"models:/{registered['model_name']}@no-such-alias", *args[1:], "--log-to-registry"]) == 2
    assert "error:" in capsys.readouterr().err


def test_every_argument_is_checked_before_the_dataset_is_made(tmp_path, capsys, isolated_dirs):
    """`sim-hopper-random-v0` would be simulated first (50k MuJoCo steps): a missing model, an unknown
    model name, --attach on an installed model and --log-to-registry without a registry are refused
    before, and no dataset file appears."""
    from helpers.models import make_bundle

    from pipeline.evaluate import main

    invdyn.fetch(make_bundle(tmp_path, names=("a-v0",)))
    d4rl = isolated_dirs / "d4rl"
    cases = [
        ([str(tmp_path / "missing" / "dir")], "missing/dir does not exist; MODEL is a model directory"),
        (["sim-hopper-random-v0"], "--datasets sim-hopper-random-v0 --export"),
        (["a-v0", "--attach"], "an installed model whose files are checksummed"),
        ([str(tmp_path / "dirs" / "a-v0"), "--log-to-registry"], "MODEL must be a models:/ URI"),
        (["models:/invdyn-x@champion", "--log-to-registry"], "needs --mlflow-uri or MLFLOW_TRACKING_URI"),
        (["a-v0", "--horizon", "0"], "must each be >= 1"),
    ]
    for (model, *flags), message in cases:
        assert main([model, "sim-hopper-random-v0", *flags]) == 2, model
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (model, err)
    assert list(d4rl.iterdir()) == []


def test_a_one_model_bundle_is_evaluated_whatever_the_dataset_is_called(trained, sim_files, tmp_path):
    from pipeline.quality.evaluate import dataset_name, load_model

    assert dataset_name("minari:mujoco/hopper/medium-v0") == "minari:mujoco/hopper/medium-v0"
    assert dataset_name(str(tmp_path / "mine.hdf5")) == "mine" and dataset_name("hopper-medium-v2") == (
        "hopper-medium-v2"
    )

    bundle = invdyn.write_bundle(tmp_path / "b.zip", {"my-cheetah": trained})
    model = load_model(str(bundle), str(sim_files["sim-halfcheetah-random-v0"]))
    assert model.obs_dim == 17 and model.source == str(bundle)
