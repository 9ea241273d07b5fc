"""Hostile datasets (HDF5 keys missing / mistyped / misshapen, Parquet of any column types, any name, path or
URL): each ends in a DatasetError or in Transitions that keep the contract; nothing lands outside caches."""

import contextlib
import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_d4rl_file
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from invdyn.errors import InvdynError
from pipeline.data.catalog import DatasetError, resolve_datasets
from pipeline.data.cli import main as datasets_cli
from pipeline.data.sources import load_transitions

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
N = 12  # rows of the base file
KEYS = ("observations", "actions", "next_observations", "terminals", "timeouts", "rewards", "infos/qpos")


def _check_contract(t):
    """What every loaded dataset promises the trainer."""
    n = len(t)
    assert n > 0 and t.obs_dim > 0 and t.act_dim > 0
    assert t.obs.shape == t.next_obs.shape == (n, t.obs_dim) and t.act.shape == (n, t.act_dim)
    assert t.obs.dtype == t.act.dtype == t.next_obs.dtype == np.float32
    assert np.isfinite(t.obs).all() and np.isfinite(t.act).all() and np.isfinite(t.next_obs).all()
    assert t.episode.shape == (n,) and (np.diff(t.episode) >= 0).all()
    assert t.stats["transitions"] == n


def _load_ok_or_dataset_error(spec, **kw):
    try:
        t = load_transitions(str(spec), **kw)
    except InvdynError as e:
        assert str(e)
        return None
    _check_contract(t)
    return t


def _only_cache_written(env_root, *inputs):
    """Files under the test's env root must be inputs or in $INVDYN_HOME/transitions."""
    stray = [
        p
        for p in env_root.rglob("*")
        if p.is_file() and "transitions" not in p.relative_to(env_root).parts[:2] and p not in inputs
    ]
    assert stray == []


def _array(kind, rows, width, rng):
    """An array of the given kind for a key: numbers, strings, complex, NaN, with any rows / width / rank."""
    shape = (rows,) if width is None else (rows, width)
    if kind == "float":
        return rng.normal(size=shape).astype(np.float32)
    if kind == "int":
        return rng.integers(-3, 3, size=shape)
    if kind == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind == "nan":
        a = rng.normal(size=shape)
        a.reshape(-1)[:: max(1, a.size // 3)] = np.nan
        return a
    if kind == "inf":
        return np.full(shape, np.inf)
    if kind == "bytes":
        return np.full(shape, b"x", dtype="S1")
    if kind == "complex":
        return np.ones(shape, np.complex64)
    if kind == "3d":
        return np.zeros((rows, width or 1, 2), np.float32)
    if kind == "scalar":
        return np.float32(1.0)
    raise AssertionError(kind)


key_change = st.tuples(
    st.sampled_from(KEYS),
    st.sampled_from(
        ["delete", "group", "float", "int", "bool", "nan", "inf", "bytes", "complex", "3d", "scalar"]
    ),
    st.sampled_from([0, 1, N - 1, N, N + 1]),  # rows
    st.sampled_from([None, 0, 1, 2, 3, 5]),  # width
)


@SETTINGS
@given(changes=st.lists(key_change, min_size=1, max_size=3), seed=st.integers(0, 3), cache=st.booleans())
@example(
    changes=[("infos/qpos", "float", N, 0)], seed=0, cache=True
)  # found by this test: crashed the cache writer
def test_hdf5_with_keys_missing_mistyped_or_misshapen(
    tmp_path, isolated_dirs, hostile_case, changes, seed, cache
):
    hostile_case("hdf5 keys")
    rng = np.random.default_rng(seed)
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=(5, 7), obs_dim=3, act_dim=2)
    with h5py.File(path, "a") as f:
        for key, kind, rows, width in changes:
            if key in f:
                del f[key]
            if kind == "group":
                f.create_group(key)
            elif kind != "delete":
                f.create_dataset(key, data=_array(kind, rows, width, rng))
    _load_ok_or_dataset_error(path, use_cache=cache)
    _only_cache_written(isolated_dirs, path)


@pytest.mark.parametrize("key", ["infos/qpos", "observations", "actions"])
def test_hdf5_key_with_zero_columns_is_refused_by_name(tmp_path, isolated_dirs, key):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=(5, 7), obs_dim=3, act_dim=2)
    with h5py.File(path, "a") as f:
        if key in f:
            del f[key]
        f.create_dataset(key, data=np.zeros((N, 0), np.float32))
    with pytest.raises(DatasetError, match=f"{key}.*no dimensions"):
        load_transitions(str(path))
    _only_cache_written(isolated_dirs, path)


attr_values = st.one_of(
    st.text(st.characters(blacklist_characters="\x00"), max_size=20),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.lists(st.integers(0, 3), min_size=0, max_size=3),
    st.sampled_from(["{", "[1, 2]", '{"a": 1}', "null", "[" * 50, '{"render_mode": "human"}']),
)


@SETTINGS
@given(
    attrs=st.dictionaries(
        st.sampled_from(["env_id", "env_kwargs", "generator", "policy", "seed", "name"]),
        attr_values,
        max_size=4,
    )
)
def test_hdf5_with_any_file_attributes(tmp_path, hostile_case, attrs):
    hostile_case("hdf5 attrs")
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path)
    with h5py.File(path, "a") as f:
        for k, v in attrs.items():
            f.attrs[k] = np.asarray(v) if isinstance(v, list) else v
    t = _load_ok_or_dataset_error(path, use_cache=False)
    if t is not None:
        assert t.stats["env_id"] is None or isinstance(t.stats["env_id"], str)
        assert isinstance(t.stats.get("env_kwargs", {}), dict)


@SETTINGS
@given(data=st.binary(max_size=600), keep=st.integers(0, 4000))
def test_hdf5_truncated_or_overwritten(tmp_path, hostile_case, data, keep):
    hostile_case("hdf5 bytes")
    good = tmp_path / "good.hdf5"
    write_d4rl_file(good)
    path = tmp_path / "bad.hdf5"
    raw = good.read_bytes()
    path.write_bytes(raw[:keep] + data + raw[keep + len(data) :] if keep < len(raw) else data)
    _load_ok_or_dataset_error(path, use_cache=False)


def test_hdf5_declaring_terabytes(tmp_path, hostile_case):
    """Chunked datasets declared with 2^40 rows (a few KB on disk): refused, never allocated."""
    hostile_case("hdf5 explicit")
    path = tmp_path / "huge.hdf5"
    with h5py.File(path, "w") as f:
        for key, width in (("observations", 3), ("next_observations", 3), ("actions", 2)):
            f.create_dataset(key, shape=(2**40, width), dtype="f4", chunks=(1024, width))
        f.create_dataset("terminals", shape=(2**40,), dtype="bool", chunks=(1024,))
    with pytest.raises(DatasetError, match="huge.hdf5"):
        load_transitions(str(path), use_cache=False)


@pytest.mark.parametrize("dtype", ["float16", "float64", "int8", "uint16"])
def test_hdf5_other_numeric_types_are_read(tmp_path, hostile_case, dtype):
    hostile_case("hdf5 explicit")
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, dtype=dtype)
    _check_contract(load_transitions(str(path)))


value_types = st.sampled_from(
    ["float", "int", "bool", "str", "null", "nested", "empty", "ragged", "scalar", "struct"]
)


def _column(kind, n, width, rng):
    if kind == "float":
        return pa.array(rng.normal(size=(n, width)).tolist())
    if kind == "int":
        return pa.array(rng.integers(0, 5, (n, width)).tolist())
    if kind == "bool":
        return pa.array(rng.integers(0, 2, (n, width)).astype(bool).tolist())
    if kind == "str":
        return pa.array([["a"] * width] * n)
    if kind == "null":
        return pa.array([None] * n, pa.list_(pa.float64()))
    if kind == "nested":
        return pa.array([[[1.0]] * width] * n)
    if kind == "empty":
        return pa.array([[]] * n, pa.list_(pa.float64()))
    if kind == "ragged":
        return pa.array([[1.0] * (1 + i % 2) for i in range(n)])
    if kind == "scalar":
        return pa.array(rng.normal(size=n))
    if kind == "struct":
        return pa.array([{"a": 1.0}] * n)
    raise AssertionError(kind)


@SETTINGS
@given(
    kinds=st.fixed_dictionaries({c: value_types for c in ("obs", "act", "next_obs")}),
    episode=st.sampled_from(["int", "float", "str", "null", "list", "missing"]),
    widths=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    rows=st.integers(0, 9),
)
def test_parquet_of_any_column_types(tmp_path, isolated_dirs, hostile_case, kinds, episode, widths, rows):
    hostile_case("parquet columns")
    rng = np.random.default_rng(0)
    ow, aw = widths
    cols = {c: _column(k, rows, ow if c != "act" else aw, rng) for c, k in kinds.items()}
    if episode != "missing":
        cols["episode"] = {
            "int": pa.array(np.arange(rows) // 3),
            "float": pa.array(np.arange(rows) / 3.0),
            "str": pa.array([str(i) for i in range(rows)]),
            "null": pa.array([None] * rows, pa.int64()),
            "list": pa.array([[i] for i in range(rows)]),
        }[episode]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(cols), path)
    t = _load_ok_or_dataset_error(path)
    if t is not None:
        assert (t.obs_dim, t.act_dim) == (ow, aw)
    _only_cache_written(isolated_dirs, path)


SPECS = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "/",
    ".",
    "",
    "   ",
    "file:///etc/passwd",
    "ftp://host/x.hdf5",
    "http://127.0.0.1:1/x.hdf5",
    "https://rail.eecs.berkeley.edu/x.hdf5",
    "javascript:alert(1)",
    "data:text/plain,abc",
    "minari:",
    "minari:../../../etc",
    "minari:/abs/path",
    "sim-../../x",
    "sim-hopper-nonsense-v0",
    "hopper-medium-v2/../../x",
    "\x00",
    "a" * 5000,
    "~no_such_user_x/x.hdf5",
    "mujoco,../x",
    "C:\\data\\x.hdf5",
]


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_odd_dataset_specs(tmp_path, monkeypatch, isolated_dirs, capsys, hostile_case, spec):
    """Library and CLI: an InvdynError / exit 1 with one `error:` line; nothing written; never simulates."""
    hostile_case("dataset spec", 3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    with pytest.raises(InvdynError) as err:
        load_transitions(spec, download=True)
    assert "Traceback" not in str(err.value)
    with contextlib.suppress(InvdynError):
        resolve_datasets(spec)
    assert datasets_cli(["prepare", spec, "--download"]) == 1
    assert "error:" in capsys.readouterr().err
    assert [p for p in tmp_path.rglob("*")] == []
    assert not list((isolated_dirs / "invdyn-home").rglob("*.arrow"))  # no dataset was cached
    assert not any((isolated_dirs / "d4rl").iterdir())


@SETTINGS
@given(
    spec=st.text(max_size=40)
    | st.builds(
        "{}://{}".format, st.from_regex(r"[a-z][a-z0-9+.-]{0,6}", fullmatch=True), st.text(max_size=15)
    )
    | st.builds(
        "{}{}".format, st.sampled_from(["../", "/", "./", "~/", "minari:", "sim-"]), st.text(max_size=15)
    )
)
def test_any_dataset_spec_string(tmp_path, isolated_dirs, monkeypatch, hostile_case, spec):
    hostile_case("dataset spec fuzz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    monkeypatch.setenv("INVDYN_SIM_TRANSITIONS", "1")  # a sim-* name that does resolve must stay cheap
    with contextlib.suppress(InvdynError):
        resolve_datasets(spec)
    with contextlib.suppress(InvdynError):
        load_transitions(spec, download=True, simulate=False)
    assert [p for p in tmp_path.rglob("*")] == []


def test_env_kwargs_attribute_cannot_inject_json(tmp_path, hostile_case):
    """env_kwargs from a file is parsed as JSON data only and must be an object."""
    hostile_case("hdf5 explicit")
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path)
    with h5py.File(path, "a") as f:
        f.attrs["env_kwargs"] = json.dumps([{"__class__": "os.system"}])
    with pytest.raises(DatasetError, match="env_kwargs"):
        load_transitions(str(path), use_cache=False)
