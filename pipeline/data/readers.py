"""Readers that turn a D4RL-layout HDF5 file or a Parquet file of pairs into Transitions (through the one
pairing rule, `make_transitions`); every error names the file and the key."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from invdyn._files import sha256_file
from pipeline.data.catalog import DatasetError, DatasetMissingError
from pipeline.data.transitions import Transitions, make_transitions

#: keys a D4RL-layout HDF5 file must have; `timeouts` and `next_observations` are optional
REQUIRED_KEYS = ("observations", "actions", "terminals")
#: when `timeouts` is missing (D4RL v0 files), episodes are cut every this many steps, as d4rl does
DEFAULT_MAX_EPISODE_STEPS = 1000
#: bumped whenever the readers' output for the same file changes (it is part of the cache key)
READER_VERSION = 2


def _check_dims(where: str, key: str, arr: np.ndarray, expected: int | None, name: str) -> None:
    if expected is not None and arr.shape[1] != expected:
        raise DatasetError(
            f"{where}: key {key!r} has {arr.shape[1]} values per row but {name} has {expected} in the "
            "catalog; the file is not that dataset (delete it and download again, or pass it by path)"
        )


def _as_2d(where: str, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DatasetError(f"{where}: key {key!r} must be 2-D (rows, dims), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise DatasetError(
            f"{where}: key {key!r} has shape {arr.shape}, no dimensions; write it with one column per "
            "dimension, or leave it out if it is optional (infos/*)"
        )
    return arr


def infer_timeouts(terminals: np.ndarray, max_steps: int = DEFAULT_MAX_EPISODE_STEPS) -> np.ndarray:
    """d4rl's rule for files without `timeouts`: an episode that did not terminate ends after max_steps."""
    n = len(terminals)
    idx = np.arange(n)
    start = np.zeros(n, bool)
    start[0:1] = True
    start[1:] = terminals[:-1]
    pos = idx - np.maximum.accumulate(np.where(start, idx, 0))
    return (pos + 1) % max_steps == 0


def open_hdf5(path):
    """h5py.File for reading, with a clear error for truncated / non-HDF5 / missing files."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetMissingError(f"dataset file {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            f"{path}: not a readable HDF5 file ({e}); it is truncated or not HDF5 - delete it and download "
            "or generate it again"
        ) from None


@contextlib.contextmanager
def _damaged_hdf5(where: str):
    """h5py reports damaged metadata from any call, as OSError, KeyError, RuntimeError or ValueError: name the
    file."""
    try:
        yield
    except DatasetError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise DatasetError(
            f"{where}: damaged HDF5 file ({type(e).__name__}: {e}); delete it and download or generate it "
            "again"
        ) from None


def check_hdf5(path) -> None:
    """Validity check of a D4RL-layout file without reading its arrays: opens, required keys, row counts."""
    with _damaged_hdf5(str(path)), open_hdf5(path) as f:
        _row_counts(f, str(path))


def _row_counts(f, where: str) -> int:
    import h5py

    for key in REQUIRED_KEYS:
        if key not in f or not isinstance(f[key], h5py.Dataset):
            found = sorted(f.keys())
            hint = (
                " It looks like a Minari file: pass minari:<dataset-id>."
                if any(k.startswith("episode_") for k in found)
                else ""
            )
            raise DatasetError(
                f"{where}: missing key {key!r} (a D4RL-layout file needs {', '.join(REQUIRED_KEYS)}; "
                f"found: {', '.join(found[:12]) or 'nothing'}{', ...' if len(found) > 12 else ''}).{hint}"
            )
    n = f["observations"].shape[0] if f["observations"].ndim else 0
    for key in (
        "actions",
        "terminals",
        "timeouts",
        "next_observations",
        "rewards",
        "infos/qpos",
        "infos/qvel",
    ):
        if key not in f:
            continue
        if not isinstance(f[key], h5py.Dataset) or not _numeric(f[key].dtype):
            raise DatasetError(f"{where}: key {key!r} must be an array of numbers, got {_describe(f[key])}")
        if f[key].shape[:1] != (n,):
            raise DatasetError(
                f"{where}: key {key!r} has {f[key].shape[0] if f[key].ndim else 0} rows but 'observations' "
                f"has {n}; every per-step key must have one row per step"
            )
        if key in ("terminals", "timeouts") and f[key].shape not in ((n,), (n, 1)):
            raise DatasetError(
                f"{where}: key {key!r} must hold one flag per step, shape ({n},), got {f[key].shape}"
            )
    if n == 0:
        raise DatasetError(f"{where}: key 'observations' is empty")
    if not _numeric(f["observations"].dtype):
        raise DatasetError(
            f"{where}: key 'observations' must be an array of numbers, got {_describe(f['observations'])}"
        )
    return n


def _numeric(dtype) -> bool:
    return (
        np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.floating)
        or np.issubdtype(dtype, np.bool_)
    )


def _describe(obj) -> str:
    return f"dtype {obj.dtype}" if hasattr(obj, "dtype") else type(obj).__name__


def _attr(value):
    """An HDF5 attribute as a plain Python value (a one-element array as its item, bytes as str)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    elif hasattr(value, "item"):
        value = value.item()
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def read_hdf5(
    path, *, name: str | None = None, expect: dict | None = None, sha256: str | None = None
) -> Transitions:
    """A D4RL-layout HDF5 file (d4rl's own files, our simulated ones, a user's) -> Transitions.

    `expect` is the catalog entry the file should match (its obs / act dims are checked).
    """
    path = Path(path)
    where = str(path)
    arrays, attrs = _read_hdf5_arrays(path, where)
    obs = _as_2d(where, "observations", arrays["observations"])
    act = _as_2d(where, "actions", arrays["actions"])
    nxt = arrays.get("next_observations")
    if nxt is not None:
        nxt = _as_2d(where, "next_observations", nxt)
        if nxt.shape[1] != obs.shape[1]:
            raise DatasetError(
                f"{where}: key 'next_observations' has {nxt.shape[1]} values per row, "
                f"'observations' {obs.shape[1]}"
            )
    if expect:
        _check_dims(where, "observations", obs, expect.get("obs_dim"), expect["name"])
        _check_dims(where, "actions", act, expect.get("act_dim"), expect["name"])
    terminals = arrays["terminals"].reshape(-1).astype(bool)
    inferred = "timeouts" not in arrays
    timeouts = infer_timeouts(terminals) if inferred else arrays["timeouts"].reshape(-1).astype(bool)
    stats = {
        "source": str(path.resolve()),
        "format": "d4rl-hdf5",
        "sha256": sha256 or sha256_file(path),
        "has_next_observations": nxt is not None,
        "timeouts_inferred": inferred,
        **_hdf5_provenance(where, attrs, expect),
    }
    qpos, qvel = (_as_2d(where, f"infos/{k}", arrays[k]) if k in arrays else None for k in ("qpos", "qvel"))
    return make_transitions(
        name or path.stem,
        where,
        obs,
        act,
        terminals=terminals,
        timeouts=timeouts,
        next_obs=nxt,
        qpos=qpos,
        qvel=qvel,
        stats=stats,
    )


def _read_hdf5_arrays(path: Path, where: str) -> tuple[dict[str, np.ndarray], dict]:
    """The per-step arrays (infos/qpos, infos/qvel as qpos, qvel) and the file attributes, checked."""
    with _damaged_hdf5(where), open_hdf5(path) as f:
        _row_counts(f, where)
        try:
            keys = (*REQUIRED_KEYS, "timeouts", "next_observations")
            arrays = {key: f[key][()] for key in keys if key in f}
            for key in ("qpos", "qvel"):
                if f"infos/{key}" in f:
                    arrays[key] = f[f"infos/{key}"][()]
        except OSError as e:
            raise DatasetError(
                f"{where}: cannot read its data ({e}); the file is truncated or damaged"
            ) from None
        except MemoryError:
            shapes = {k: f[k].shape for k in ("observations", "actions")}
            raise DatasetError(
                f"{where}: its arrays {shapes} do not fit in memory; is the file damaged?"
            ) from None
        try:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
        except (OSError, ValueError, TypeError) as e:
            raise DatasetError(f"{where}: unreadable file attributes ({e})") from None
    return arrays, attrs


def _hdf5_provenance(where: str, attrs: dict, expect: dict | None) -> dict:
    """env_id (the file's attribute, else the catalog's), and for a simulated file its generator, policy,
    seed and env_kwargs."""
    env_id = attrs.get("env_id")
    out = {"env_id": env_id if isinstance(env_id, str) and env_id else (expect or {}).get("env_id")}
    if attrs.get("generator"):
        out.update(generator=attrs["generator"], policy=attrs.get("policy"), seed=attrs.get("seed"))
    if attrs.get("env_kwargs"):
        try:
            out["env_kwargs"] = json.loads(attrs["env_kwargs"])
        except (TypeError, ValueError, RecursionError):
            out["env_kwargs"] = None
        if not isinstance(out["env_kwargs"], dict):
            raise DatasetError(
                f"{where}: attribute 'env_kwargs' must be a JSON object, got {attrs['env_kwargs']!r:.80}"
            )
    return out


PARQUET_COLUMNS = ("obs", "act", "next_obs", "episode")


def read_parquet(
    path, *, name: str | None = None, expect: dict | None = None, sha256: str | None = None
) -> Transitions:
    """A Parquet file of pairs: list columns obs, act, next_obs and an integer episode column."""
    path = Path(path)
    where = str(path)
    table = _parquet_table(path, where)
    obs, act, nxt = (_parquet_matrix(table, where, col) for col in ("obs", "act", "next_obs"))
    if nxt.shape[1] != obs.shape[1]:
        raise DatasetError(
            f"{where}: column 'next_obs' has {nxt.shape[1]} values per row, 'obs' {obs.shape[1]}"
        )
    if expect:
        _check_dims(where, "obs", obs, expect.get("obs_dim"), expect["name"])
        _check_dims(where, "act", act, expect.get("act_dim"), expect["name"])
    episode = table.column("episode").to_numpy()
    if not np.issubdtype(episode.dtype, np.integer):
        raise DatasetError(f"{where}: column 'episode' must hold integers, got {episode.dtype}")
    # rows are pairs already; a change of episode id is the boundary (kept only for episode-wise splits)
    change = np.concatenate([episode[1:] != episode[:-1], [True]])
    stats = {
        "source": str(path.resolve()),
        "format": "parquet",
        "sha256": sha256 or sha256_file(path),
        "env_id": (expect or {}).get("env_id"),
        "has_next_observations": True,
    }
    return make_transitions(
        name or path.stem,
        where,
        obs,
        act,
        terminals=change,
        timeouts=np.zeros(len(obs), bool),
        next_obs=nxt,
        stats=stats,
    )


def _parquet_table(path: Path, where: str):
    """The whole table, with the columns a Parquet dataset needs and at least one row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DatasetMissingError(f"dataset file {path} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{where}: not a readable Parquet file ({e})") from None
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"{where}: missing column(s) {', '.join(missing)} (a Parquet dataset needs list columns obs, "
            f"act, next_obs and an integer episode column; found: {', '.join(table.column_names)})"
        )
    if table.num_rows == 0:
        raise DatasetError(f"{where}: no rows")
    return table


def _parquet_matrix(table, where: str, col: str) -> np.ndarray:
    """A list column of numbers, all rows the same length, as a float64 (rows, dims) array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = table.column(col).combine_chunks()
    kind = arr.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise DatasetError(f"{where}: column {col!r} must hold one list of numbers per row, got {kind}")
    value = kind.value_type
    if not (pa.types.is_integer(value) or pa.types.is_floating(value) or pa.types.is_boolean(value)):
        raise DatasetError(f"{where}: column {col!r} must hold lists of numbers, got {kind}")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if arr.null_count or len(set(lengths.tolist())) != 1:
        raise DatasetError(f"{where}: column {col!r} has rows of different lengths or nulls")
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return values.reshape(len(arr), int(lengths[0]))
