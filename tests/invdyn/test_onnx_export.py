"""ONNX export: onnxruntime on raw (obs, next_obs) equals `predict` to 1e-5 for every architecture, on a
(B, obs_dim) batch of any B and a (B, H, obs_dim) batch (flattened and restored); the card is beside the
file and in its metadata; --normalized-io exports the network alone."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers.models import make_model_dir

import invdyn
from invdyn.__main__ import main
from invdyn.models import ResMlpInvDynamic
from invdyn.onnx_export import CARD_KEY, export_onnx

OBS_DIM, ACT_DIM = 7, 3


def _res_mlp_dir(path):
    torch.manual_seed(1)
    net = ResMlpInvDynamic(OBS_DIM, ACT_DIM, hidden_dim=32, n_blocks=2, action_scale=2.0)
    with torch.no_grad():  # trained-looking running scale, LayerNorm weights that are not all ones
        net.delta_scale.sq_mean.copy_(torch.linspace(0.1, 4.0, OBS_DIM))
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    norm = invdyn.GaussianNormalizer(np.linspace(-1, 1, OBS_DIM), np.linspace(0.5, 3, OBS_DIM))
    return invdyn.save_model_dir(path, net, norm, name=path.name)


def _mlp_dir(path):
    torch.manual_seed(2)
    net = invdyn.MlpInvDynamic(OBS_DIM, ACT_DIM, hidden_dim=24, tanh_out_activation=False)
    norm = invdyn.GaussianNormalizer(np.zeros(OBS_DIM), np.r_[np.ones(OBS_DIM - 1), 0.0])  # a constant dim
    return invdyn.save_model_dir(path, net, norm, name=path.name)


MAKERS = {
    "fancy_mlp": lambda p: make_model_dir(p, obs_dim=OBS_DIM, act_dim=ACT_DIM, hidden_dim=32),
    "mlp": _mlp_dir,
    "res_mlp": _res_mlp_dir,
}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    name = f"{request.param.replace('_', '-')}-v0"
    src = MAKERS[request.param](root / name)
    out = root / "out" / "model.onnx"
    assert main(["export-onnx", name, "--source", str(src), "--out", str(out)]) == 0
    return invdyn.load(name, source=src), out


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _states(model, shape, seed):
    rng = np.random.default_rng(seed)
    mean, std = model.normalizer.mean, model.normalizer.std
    return [(mean + 1.5 * std * rng.normal(size=(*shape, model.obs_dim))).astype(np.float32) for _ in (0, 1)]


@pytest.mark.parametrize("batch", [1, 5, 4096])
def test_onnxruntime_equals_predict_on_a_batch(exported, batch):
    model, out = exported
    obs, nxt = _states(model, (batch,), batch)
    (act,) = _session(out).run(None, {"obs": obs, "next_obs": nxt})
    assert act.shape == (batch, ACT_DIM) and act.dtype == np.float32
    np.testing.assert_allclose(act, model.predict(obs, nxt), rtol=0, atol=1e-5)


def test_onnxruntime_on_a_planners_trajectories_flattened_and_restored(exported):
    model, out = exported
    obs, nxt = _states(model, (6, 16), 7)  # (B, H, obs_dim)
    flat = {"obs": obs.reshape(-1, OBS_DIM), "next_obs": nxt.reshape(-1, OBS_DIM)}
    act = _session(out).run(["action"], flat)[0].reshape(6, 16, ACT_DIM)
    np.testing.assert_allclose(act, model.predict(obs, nxt), rtol=0, atol=1e-5)


def test_the_card_names_opset_inputs_and_outputs(exported):
    model, out = exported
    card = json.loads((out.parent / "model.onnx.json").read_text())
    graph = onnx.load(out)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta[CARD_KEY]) == card and meta["invdyn.version"] == invdyn.__version__
    assert card["opset"] == next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i["name"] for i in card["inputs"]] == [i.name for i in graph.graph.input] == ["obs", "next_obs"]
    assert [o["name"] for o in card["outputs"]] == [o.name for o in graph.graph.output] == ["action"]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", OBS_DIM] and card["inputs"][0]["shape"] == ["batch", OBS_DIM]
    assert card["model"] == model.name and card["normalized_io"] is False
    assert card["weights_sha256"] == model.params["weights"]["sha256"]
    assert card["check"]["max_abs_error"] <= 1e-5
    assert not any(p.key.startswith("pkg.torch") for n in graph.graph.node for p in n.metadata_props)


def test_normalized_io_is_the_network_alone(tmp_path):
    src = make_model_dir(tmp_path / "m-v0", obs_dim=OBS_DIM, act_dim=ACT_DIM, hidden_dim=16)
    model = invdyn.load("m-v0", source=src)
    out = tmp_path / "n.onnx"
    card = export_onnx(model, out, normalized_io=True)
    assert card["normalized_io"] is True and [i["name"] for i in card["inputs"]] == [
        "obs_normalized",
        "next_obs_normalized",
    ]
    obs, nxt = (model.normalizer.normalize(x) for x in _states(model, (33,), 3))
    (act,) = _session(out).run(None, {"obs_normalized": obs, "next_obs_normalized": nxt})
    np.testing.assert_allclose(act, model.predict_normalized(obs, nxt), rtol=0, atol=1e-5)
    np.testing.assert_allclose(card["normalizer"]["mean"], model.normalizer.mean)


def test_the_command_line_contract(tmp_path):
    """`python -m invdyn export-onnx NAME --source DIR --out F.onnx` in a fresh process."""
    src = make_model_dir(tmp_path / "hopper-medium-v2", obs_dim=11, act_dim=3, hidden_dim=16)
    out = tmp_path / "F.onnx"
    cmd = [
        sys.executable,
        "-m",
        "invdyn",
        "export-onnx",
        "hopper-medium-v2",
        "--source",
        str(src),
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "opset" in run.stdout and run.stderr == ""
    model = invdyn.load("hopper-medium-v2", source=src)
    obs, nxt = _states(model, (9,), 0)
    np.testing.assert_allclose(
        _session(out).run(None, {"obs": obs, "next_obs": nxt})[0], model.predict(obs, nxt), rtol=0, atol=1e-5
    )


def test_without_onnx_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    src = make_model_dir(tmp_path / "m-v0", hidden_dim=8)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    assert main(["export-onnx", "m-v0", "--source", str(src), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "pip install 'invdyn[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert main(["export-onnx", "no-such-v0", "--out", str(tmp_path / "x.onnx")]) == 1
    assert "no model named 'no-such-v0'" in capsys.readouterr().err


def test_an_ensemble_exports_its_mean_and_spread(tmp_path):
    from pipeline.training.ensemble import write_ensemble

    norm = invdyn.GaussianNormalizer(np.linspace(-1, 1, OBS_DIM), np.linspace(0.5, 3, OBS_DIM))
    members = []
    for i in range(3):  # one normalizer, different weights: what seeds on one dataset give
        torch.manual_seed(i)
        net = invdyn.FancyMlpInvDynamic(OBS_DIM, ACT_DIM, hidden_dim=32)
        members.append(invdyn.save_model_dir(tmp_path / f"m{i}", net, norm, name="ens-v0"))
    src = write_ensemble(tmp_path / "ens-v0", members)
    out = tmp_path / "ens.onnx"
    assert main(["export-onnx", "ens-v0", "--source", str(src), "--out", str(out)]) == 0
    model = invdyn.load("ens-v0", source=src)
    obs, nxt = _states(model, (64,), seed=3)
    mean, std = model.predict(obs, nxt, return_std=True)
    assert float(np.abs(std).max()) > 1e-3  # the members differ: the spread is not trivially zero
    got_mean, got_std = _session(out).run(["action", "action_std"], {"obs": obs, "next_obs": nxt})
    np.testing.assert_allclose(got_mean, mean, atol=1e-5)
    np.testing.assert_allclose(got_std, std, atol=1e-5)
    card = json.loads((tmp_path / "ens.onnx.json").read_text())
    assert [o["name"] for o in card["outputs"]] == ["action", "action_std"] and "3 members" in card[
        "outputs"
    ][1]["is"]
    normalized = tmp_path / "ens-n.onnx"
    assert (
        main(["export-onnx", "ens-v0", "--source", str(src), "--out", str(normalized), "--normalized-io"])
        == 0
    )
    o_n, n_n = (model.normalizer.normalize(x).astype(np.float32) for x in (obs, nxt))
    got = _session(normalized).run(None, {"obs_normalized": o_n, "next_obs_normalized": n_n})
    np.testing.assert_allclose(got[0], mean, atol=1e-5)
