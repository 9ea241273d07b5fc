"""Hostile model directories (arbitrary JSON in any params.json field, arbitrary bytes as params.json, the
checkpoint or model.safetensors, parser-crashing JSON, terabyte configs, code-running pickles, crafted
safetensors headers): an invdyn error or a good model."""

import copy
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from helpers.models import make_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import invdyn
from invdyn._files import sha256_file
from invdyn.errors import FormatError, InvdynError, ShapeError

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: any JSON value, small
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

#: places in params.json a crafted file can put anything
FIELDS = [
    (),
    ("config",),
    ("config", "obs_dim"),
    ("config", "act_dim"),
    ("config", "hidden_dim"),
    ("config", "action_scale"),
    ("config", "tanh_out_activation"),
    ("config", "add_norm"),
    ("normalizers",),
    ("normalizers", "state"),
    ("normalizers", "state", "mean"),
    ("normalizers", "state", "std"),
    ("architecture",),
    ("architecture", "name"),
    ("architecture", "dropout"),
    ("architecture", "n_blocks"),
    ("weights",),
    ("weights", "file"),
    ("weights", "sha256"),
    ("weights", "safetensors"),
    ("weights", "safetensors", "file"),
    ("weights", "safetensors", "sha256"),
    ("format_version",),
    ("metrics",),
    ("name",),
]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("good") / "m-v0", obs_dim=4, act_dim=2, hidden_dim=8)


def _copy_dir(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _ckpt_only(d):
    """`d` as invdyn 0.1 wrote it (model.ckpt only), so that the checkpoint is what gets parsed."""
    (d / "model.safetensors").unlink()
    params = json.loads((d / "params.json").read_text())
    del params["weights"]["safetensors"]
    (d / "params.json").write_text(json.dumps(params))
    return d


def _rerecord(d, fname="model.ckpt"):
    """Record `fname`'s current sha256 in params.json: the attacker controls the whole directory."""
    params = json.loads((d / "params.json").read_text())
    entry = params["weights"] if fname == "model.ckpt" else params["weights"]["safetensors"]
    entry["sha256"] = sha256_file(d / fname)
    (d / "params.json").write_text(json.dumps(params))


def _set(obj, path, value, delete=False):
    if not path:
        return value
    cur = obj
    for key in path[:-1]:
        if not isinstance(cur.get(key), dict):
            cur[key] = {}
        cur = cur[key]
    if delete:
        cur.pop(path[-1], None)
    else:
        cur[path[-1]] = value
    return obj


def _load_ok_or_invdyn_error(model_dir):
    """The only two acceptable outcomes; a loaded model must also predict with the right shape."""
    try:
        model = invdyn.read_model_dir(model_dir)
    except InvdynError as e:
        assert str(e), "an error must say what is wrong"
        return None
    obs = np.zeros((3, model.obs_dim), np.float32)
    assert model.predict(obs, obs).shape == (3, model.act_dim)
    return model


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values, delete=st.booleans())
def test_params_json_with_any_field_replaced(good_dir, tmp_path, hostile_case, field, value, delete):
    hostile_case("params.json field")
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    params = json.loads((good_dir / "params.json").read_text())
    mutated = _set(copy.deepcopy(params), field, value, delete=delete and bool(field))
    (d / "params.json").write_text(json.dumps(mutated))
    _load_ok_or_invdyn_error(d)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["m-v0", *(p.name for p in d.iterdir())])


@SETTINGS
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_params_json_arbitrary_bytes(good_dir, tmp_path, hostile_case, data):
    hostile_case("params.json bytes")
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    (d / "params.json").write_bytes(data)
    with pytest.raises(InvdynError):
        invdyn.read_model_dir(d)


@SETTINGS
@given(data=st.binary(max_size=2000), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02"]))
def test_checkpoint_arbitrary_bytes(good_dir, tmp_path, hostile_case, data, prefix):
    """Random bytes whose sha256 is (re)recorded in params.json: torch must refuse them cleanly."""
    hostile_case("checkpoint bytes")
    d = _ckpt_only(_copy_dir(good_dir, tmp_path / "m-v0"))
    (d / "model.ckpt").write_bytes(prefix + data)
    _rerecord(d)
    with pytest.raises(InvdynError):
        invdyn.read_model_dir(d)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError inside json
        '{"format_version": ' + "9" * 5000 + "}",  # int too long for str -> int
        "\ufeff{}",  # BOM
        "null",
        '"params"',
        "NaN",
        "{" + '"a": 1, ' * 10_000 + '"b": 2}',
    ],
    ids=["deep", "bigint", "bom", "null", "string", "nan", "wide"],
)
def test_params_json_that_breaks_the_parser(good_dir, tmp_path, hostile_case, text):
    hostile_case("params.json explicit")
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    (d / "params.json").write_text(text)
    with pytest.raises(FormatError, match="params.json"):
        invdyn.read_model_dir(d)


@pytest.mark.parametrize("dims", [(10**6, 10**6), (4, 2**62), (4, 2**80)], ids=["terabytes", "2^62", "2^80"])
def test_absurd_sizes_never_allocate(good_dir, tmp_path, hostile_case, dims):
    """A 1e6 x 1e6 config would need terabytes: refused by comparing shapes before anything is allocated."""
    hostile_case("params.json explicit")
    obs_dim, hidden = dims
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    params = json.loads((d / "params.json").read_text())
    params["config"].update(obs_dim=obs_dim, hidden_dim=hidden)
    params["normalizers"]["state"] = {"mean": [0.0] * min(obs_dim, 10**6), "std": [1.0] * min(obs_dim, 10**6)}
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises((ShapeError, FormatError)):
        invdyn.read_model_dir(d)


@pytest.mark.parametrize(
    "weights",
    [
        [1],
        "model.ckpt",
        5,
        {"file": 5},
        {"file": ["x"]},
        {"file": "../model.ckpt"},
        {"file": "/etc/passwd"},
        {"file": "sub/model.ckpt"},
        {"file": "model.ckpt", "sha256": 7},
        {"file": "model.ckpt", "safetensors": 5},
        {"file": "model.ckpt", "safetensors": None},
        {"file": "model.ckpt", "safetensors": {"file": "model.safetensors"}},
        {"file": "model.ckpt", "safetensors": {"file": "../model.safetensors", "sha256": "ab" * 32}},
        {"file": "model.ckpt", "safetensors": {"file": "model.safetensors", "sha256": ["ab"]}},
    ],
)
def test_weights_entry_of_any_shape(good_dir, tmp_path, hostile_case, weights):
    hostile_case("params.json explicit")
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    params = json.loads((d / "params.json").read_text())
    params["weights"] = weights
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError, match="weights"):
        invdyn.read_model_dir(d)


class _Canary:
    """Unpickling this creates a file: the proof that a loader ran code from a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


@pytest.mark.parametrize("wrap", ["top", "in_state_dict"])
def test_pickle_payload_in_checkpoint_never_runs(good_dir, tmp_path, hostile_case, wrap):
    hostile_case("checkpoint explicit")
    d = _ckpt_only(_copy_dir(good_dir, tmp_path / "m-v0"))
    canary = tmp_path / "pwned"
    state = torch.load(d / "model.ckpt", weights_only=True)["state_dict"]
    obj = (
        _Canary(str(canary))
        if wrap == "top"
        else {"state_dict": {**state, "mlp.0.weight": _Canary(str(canary))}}
    )
    torch.save(obj, d / "model.ckpt")
    params = json.loads((d / "params.json").read_text())
    params["weights"]["sha256"] = sha256_file(d / "model.ckpt")
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError, match="not a readable torch checkpoint"):
        invdyn.read_model_dir(d)
    assert not canary.exists()
    # and plain pickle (not torch's zip format) is refused the same way
    (d / "model.ckpt").write_bytes(pickle.dumps(_Canary(str(canary))))
    params["weights"]["sha256"] = sha256_file(d / "model.ckpt")
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(FormatError):
        invdyn.read_model_dir(d)
    assert not canary.exists()


def test_with_safetensors_recorded_the_checkpoint_is_hashed_never_unpickled(good_dir, tmp_path, hostile_case):
    """A code-running checkpoint beside good safetensors (its checksum recorded): the model loads from
    model.safetensors and the payload never runs."""
    hostile_case("checkpoint explicit")
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    canary = tmp_path / "pwned"
    state = torch.load(d / "model.ckpt", weights_only=True)["state_dict"]
    torch.save({"state_dict": state, "hook": _Canary(str(canary))}, d / "model.ckpt")
    _rerecord(d)
    assert _load_ok_or_invdyn_error(d) is not None, "the safetensors weights should load"
    assert not canary.exists()


@pytest.mark.parametrize("kind", ["complex", "int", "nested", "missing_key", "extra_key", "list"])
def test_state_dict_of_the_wrong_kind(good_dir, tmp_path, hostile_case, kind):
    hostile_case("checkpoint explicit")
    d = _ckpt_only(_copy_dir(good_dir, tmp_path / "m-v0"))
    sd = torch.load(d / "model.ckpt", weights_only=True)["state_dict"]
    key = "mlp.0.weight"
    if kind == "complex":
        sd[key] = sd[key].to(torch.complex64)
    elif kind == "int":
        sd[key] = sd[key].to(torch.int32)
    elif kind == "nested":
        sd[key] = {"x": sd[key]}
    elif kind == "missing_key":
        del sd[key]
    elif kind == "extra_key":
        sd["evil"] = torch.zeros(1)
    torch.save([sd] if kind == "list" else {"state_dict": sd}, d / "model.ckpt")
    params = json.loads((d / "params.json").read_text())
    params["weights"]["sha256"] = sha256_file(d / "model.ckpt")
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(InvdynError):
        invdyn.read_model_dir(d)


def test_checkpoint_zip_with_traversal_member_is_not_extracted(good_dir, tmp_path, hostile_case):
    """torch reads its zip checkpoint in memory; a '../' member must not be written anywhere."""
    hostile_case("checkpoint explicit")
    d = _copy_dir(good_dir, tmp_path / "work" / "m-v0")
    with zipfile.ZipFile(d / "model.ckpt", "a") as zf:
        zf.writestr("../../escaped.txt", b"x")
    params = json.loads((d / "params.json").read_text())
    params["weights"]["sha256"] = sha256_file(d / "model.ckpt")
    (d / "params.json").write_text(json.dumps(params))
    _load_ok_or_invdyn_error(d)
    assert not list(tmp_path.rglob("escaped.txt"))


# ---- model.safetensors: what is hashed is what is parsed; a crafted file with a matching checksum is still
# ---- refused by safetensors' parser or by the shape check, never a crash


def _safetensors_dir(good_dir, tmp_path, data: bytes):
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    (d / "model.safetensors").write_bytes(data)
    _rerecord(d, "model.safetensors")
    return d


def _header(entries: dict, body: bytes = b"") -> bytes:
    text = json.dumps(entries).encode()
    return struct.pack("<Q", len(text)) + text + body


@SETTINGS
@given(cut=st.integers(1, 400), flip=st.integers(0, 10**6), rerecord=st.booleans())
def test_safetensors_truncated_or_flipped(good_dir, tmp_path, hostile_case, cut, flip, rerecord):
    """Flipped or cut bytes: a ChecksumError; with the checksum re-recorded, an invdyn error or (a flip in
    tensor data) a model that still predicts."""
    hostile_case("safetensors bytes")
    data = bytearray((good_dir / "model.safetensors").read_bytes())
    if flip % 2:
        data[flip % len(data)] ^= 0xFF
    else:
        del data[-cut:]
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    (d / "model.safetensors").write_bytes(bytes(data))
    if not rerecord:
        with pytest.raises(invdyn.ChecksumError, match="model.safetensors"):
            invdyn.read_model_dir(d)
        return
    _rerecord(d, "model.safetensors")
    _load_ok_or_invdyn_error(d)


@SETTINGS
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", struct.pack("<Q", 40), b"\xff" * 8]))
def test_safetensors_arbitrary_bytes(good_dir, tmp_path, hostile_case, data, prefix):
    hostile_case("safetensors bytes")
    d = _safetensors_dir(good_dir, tmp_path, prefix + data)
    with pytest.raises(InvdynError):
        invdyn.read_model_dir(d)


def _state(good_dir):
    from safetensors.torch import load_file

    return load_file(good_dir / "model.safetensors")


@pytest.mark.parametrize(
    "kind", ["extra_tensor", "missing_tensor", "renamed", "wrong_shape", "int", "complex", "empty"]
)
def test_safetensors_with_the_wrong_tensors(good_dir, tmp_path, hostile_case, kind):
    from safetensors.torch import save

    hostile_case("safetensors explicit")
    sd, key = _state(good_dir), "mlp.0.weight"
    if kind == "extra_tensor":
        sd["evil"] = torch.zeros(1)
    elif kind == "missing_tensor":
        del sd[key]
    elif kind == "renamed":
        sd["module." + key] = sd.pop(key)
    elif kind == "wrong_shape":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    elif kind in ("int", "complex"):
        sd[key] = sd[key].to(torch.int32 if kind == "int" else torch.complex64)
    elif kind == "empty":
        sd = {}
    d = _safetensors_dir(good_dir, tmp_path, save(sd))
    expected = (
        ShapeError
        if kind in ("extra_tensor", "missing_tensor", "renamed", "wrong_shape", "empty")
        else FormatError
    )
    with pytest.raises(expected, match="model.safetensors"):
        invdyn.read_model_dir(d)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 2**62) + b"{}",  # a header length no file has
        _header({"mlp.0.weight": {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 10**9]}}),
        _header(
            {"mlp.0.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16
        ),
        _header({"mlp.0.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _header({"mlp.0.weight": {"dtype": "PY", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _header(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),
        struct.pack("<Q", 20_000) + b"[" * 10_000 + b"]" * 10_000,
        b"",
    ],
    ids=[
        "huge-header",
        "offsets-past-end",
        "overflowing-shape",
        "negative-shape",
        "unknown-dtype",
        "overlap",
        "deep",
        "empty",
    ],
)
def test_safetensors_crafted_headers(good_dir, tmp_path, hostile_case, data):
    hostile_case("safetensors explicit")
    d = _safetensors_dir(good_dir, tmp_path, data)
    with pytest.raises(FormatError, match="model.safetensors"):
        invdyn.read_model_dir(d)


def test_oversized_weights_are_refused_unread(good_dir, tmp_path, hostile_case, monkeypatch):
    import invdyn.weights

    hostile_case("safetensors explicit")
    d = _copy_dir(good_dir, tmp_path / "m-v0")
    monkeypatch.setattr(invdyn.weights, "MAX_WEIGHTS_BYTES", 100)
    with pytest.raises(FormatError, match="implausibly large"):
        invdyn.read_model_dir(d)
