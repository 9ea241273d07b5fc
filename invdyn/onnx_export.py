"""ONNX export with the normalizer inside: raw (obs, next_obs) -> raw action with a dynamic batch dimension,
checked against `predict`, and a card (opset, input and output names) beside the file and in its metadata."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from ._files import atomic_file, write_json
from .errors import InvdynError
from .pretrained import PretrainedIDM

#: graph inputs on raw observations, and on observations already normalized (--normalized-io)
RAW_INPUTS = ("obs", "next_obs")
NORMALIZED_INPUTS = ("obs_normalized", "next_obs_normalized")
OUTPUT = "action"
#: an ensemble's second output: the members' std per action dimension (`predict(..., return_std=True)`)
STD_OUTPUT = "action_std"
#: onnxruntime's answer may differ from predict's by float32 rounding only; more is a broken export
MAX_ERROR = 1e-4
#: the card's key in the ONNX model's metadata_props (the JSON written beside the file)
CARD_KEY = "invdyn.card"


class RawIO(nn.Module):
    """The network behind the model's normalizer, float32 as `predict` computes: (x - mean) / std."""

    def __init__(self, net: nn.Module, normalizer):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(normalizer.mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(normalizer.std, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.mean) / self.std, (next_obs - self.mean) / self.std)


class MembersMean(nn.Module):
    """An ensemble's members as one module: their mean action and their std (population, as `predict`)."""

    def __init__(self, nets):
        super().__init__()
        self.members = nn.ModuleList(nets)

    def forward(self, obs: torch.Tensor, next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = torch.stack([net(obs, next_obs) for net in self.members])
        mean = outs.mean(0)
        return mean, (outs - mean).square().mean(0).sqrt()


def _members(model: PretrainedIDM) -> list | None:
    members = getattr(model, "members", None)
    return list(members) if members is not None else None


def _output_names(model: PretrainedIDM) -> list[str]:
    """The graph's outputs: the action, and an ensemble's spread beside it."""
    return [OUTPUT] if _members(model) is None else [OUTPUT, STD_OUTPUT]


def card_path(onnx_path) -> Path:
    """Where the card of `onnx_path` is written: `F.onnx` -> `F.onnx.json`."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def export_onnx(model: PretrainedIDM, out, *, normalized_io: bool = False, opset: int | None = None) -> dict:
    """Write `model` as an ONNX graph to `out` (and its card to `out`.json); returns the card.

    The graph maps (batch, obs_dim) float32 inputs to (batch, act_dim) actions; with `normalized_io` it
    is the network alone, on observations normalized with the card's mean / std. When onnxruntime is
    installed the graph is run against the model before anything is written.
    """
    onnx = _require_onnx()
    members = _members(model)
    # a CPU copy: the caller's model stays where it is
    net = copy.deepcopy(model.net if members is None else MembersMean(members)).cpu().train(False)
    module = net if normalized_io else RawIO(net, model.normalizer)
    inputs = NORMALIZED_INPUTS if normalized_io else RAW_INPUTS
    # two different example tensors: the exporter would merge identical ones into one input
    examples = (torch.zeros(2, model.obs_dim), torch.ones(2, model.obs_dim))
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            examples,
            None,
            dynamo=True,
            opset_version=opset,
            input_names=list(inputs),
            output_names=_output_names(model),
            dynamic_shapes={name: {0: batch} for name in ("obs", "next_obs")},
            verbose=False,
        )
    proto = program.model_proto
    for node in proto.graph.node:  # source paths and stack traces of this machine: not part of a model
        del node.metadata_props[:]
    card = _card(model, proto, inputs, normalized_io)
    card["check"] = _check_against_predict(model, proto.SerializeToString(), inputs, normalized_io)
    for key, value in ((CARD_KEY, json.dumps(card, sort_keys=True)), ("invdyn.version", __version__)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    out = Path(out)
    with atomic_file(out) as f:
        f.write(proto.SerializeToString())
    write_json(card_path(out), card)
    return card


@contextlib.contextmanager
def _quiet_exporter():
    """Without the exporter's notices (deprecations, axis names, "torchvision is not installed")."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _card(model: PretrainedIDM, proto, inputs, normalized_io: bool) -> dict:
    params = model.params
    state = "normalized with the card's normalizer" if normalized_io else "raw"
    weights = params.get("weights") or {}
    return {
        "model": model.name,
        "dataset": {k: (params.get("dataset") or {}).get(k) for k in ("name", "sha256")},
        "weights_sha256": weights.get("sha256"),  # params.json's, the identity the registry records
        "architecture": params.get("architecture") or {"name": "fancy_mlp"},
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "producer": f"torch {torch.__version__} (torch.onnx, dynamo exporter)",
        "inputs": [
            {"name": inputs[0], "shape": ["batch", model.obs_dim], "dtype": "float32", "is": f"s_t, {state}"},
            {
                "name": inputs[1],
                "shape": ["batch", model.obs_dim],
                "dtype": "float32",
                "is": f"s_t+1, {state}",
            },
        ],
        "outputs": [{"name": OUTPUT, "shape": ["batch", model.act_dim], "dtype": "float32", "is": "a_t, raw"}]
        + (
            []
            if _members(model) is None
            else [
                {
                    "name": STD_OUTPUT,
                    "shape": ["batch", model.act_dim],
                    "dtype": "float32",
                    "is": f"the {len(_members(model))} members' std of a_t ({OUTPUT} is their mean)",
                }
            ]
        ),
        "normalized_io": normalized_io,
        "normalizer": model.normalizer.to_dict(),
        "leading_dims": "flatten (B, H, obs_dim) to (B * H, obs_dim); reshape the action to (B, H, act_dim)",
        "invdyn_version": __version__,
    }


def _check_against_predict(model: PretrainedIDM, graph: bytes, inputs, normalized_io: bool) -> dict | None:
    """Run the graph in onnxruntime on states around the data's mean; InvdynError past MAX_ERROR."""
    try:
        import onnxruntime
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    mean, std = model.normalizer.mean, model.normalizer.std
    obs, nxt = (mean + std * rng.normal(size=(2, 64, model.obs_dim))).astype(np.float32)
    names = _output_names(model)
    ensemble = len(names) > 1  # then predict gives (mean, std), the graph's two outputs
    if normalized_io:
        obs, nxt = (model.normalizer.normalize(x).astype(np.float32) for x in (obs, nxt))
        expected = model.predict_normalized(obs, nxt, return_std=ensemble)
    else:
        expected = model.predict(obs, nxt, return_std=ensemble)
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(names, {inputs[0]: obs, inputs[1]: nxt})
    expected = list(expected) if ensemble else [expected]
    error = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    if not error <= MAX_ERROR:
        raise InvdynError(
            f"the exported graph differs from predict by {error:.3g} (> {MAX_ERROR}); not written"
        )
    return {"runtime": f"onnxruntime {onnxruntime.__version__}", "batch": 64, "max_abs_error": error}


def _require_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as e:
        raise InvdynError(
            f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): "
            "pip install 'invdyn[onnx]'"
        ) from None
    return onnx
