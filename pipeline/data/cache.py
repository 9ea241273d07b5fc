"""Prepared transitions cached as Arrow IPC files under $INVDYN_HOME/transitions/, one per source content
(sha256), memory-mapped on read; and the index that spares re-hashing an unchanged source."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from invdyn._files import atomic_file, sha256_file, write_json
from invdyn.settings import invdyn_home
from pipeline.data.readers import READER_VERSION
from pipeline.data.transitions import Transitions

_MATRICES = ("obs", "act", "next_obs", "qpos", "qvel")
#: a file modified less than this before it was hashed is re-hashed on the next load (coarse timestamps)
RACY_NS = 2_000_000_000


def cache_dir() -> Path:
    return invdyn_home() / "transitions"


def cache_path(sha256: str, kind: str = "hdf5") -> Path:
    """`<sha256>-<kind>-r<version>.arrow`: the source's content, the reader that parsed it (a source kind's
    cache_tag: hdf5 / parquet / minari) and the readers' version. Columns obs, act, next_obs (fixed-size
    lists), episode, optional qpos / qvel; the stats as JSON in the schema metadata."""
    return cache_dir() / f"{sha256}-{kind}-r{READER_VERSION}.arrow"


def _index_path(source: Path) -> Path:
    """`sources/<hash of path>.json`: (path, size, mtime, inode) -> sha256, so an unchanged source is not
    re-hashed on every load; any change of the file re-hashes it."""
    return cache_dir() / "sources" / (hashlib.sha256(str(source).encode()).hexdigest()[:32] + ".json")


def _fingerprint(source: Path) -> dict:
    st = source.stat()
    return {"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def known_sha256(source, *, strict: bool = True) -> str | None:
    """The source's sha256 if it was hashed before and the file has not changed since (no hashing).

    As in git's index, `strict` trusts an entry only if the file was already RACY_NS old when it was
    hashed: a rewrite within the file system's timestamp resolution could otherwise keep size and mtime.
    (`strict=False` is for display only, e.g. the `list` command's status column.)
    """
    source = Path(source).resolve()
    try:
        entry = json.loads(_index_path(source).read_text())
        fp = _fingerprint(source)
        if entry["fingerprint"] == fp and (not strict or entry["hashed_at_ns"] - fp["mtime_ns"] > RACY_NS):
            return entry["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def source_sha256(source) -> str:
    """sha256 of a source file, taken from the index when the file is unchanged, else computed and indexed."""
    source = Path(source).resolve()
    sha = known_sha256(source)
    if sha is None:
        before, hashed_at = _fingerprint(source), time.time_ns()
        sha = sha256_file(source)
        if _fingerprint(source) == before:  # not modified while we read it
            with contextlib.suppress(OSError):
                _index_path(source).parent.mkdir(parents=True, exist_ok=True)
                write_json(
                    _index_path(source), {"fingerprint": before, "sha256": sha, "hashed_at_ns": hashed_at}
                )
    return sha


def write(t: Transitions, path) -> Path:
    """Write `t` as one Arrow record batch (so every column maps as one contiguous buffer), atomically."""
    import pyarrow as pa

    columns, fields = [], []
    for key in _MATRICES:
        arr = getattr(t, key)
        if arr is None:
            continue
        flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
        columns.append(pa.FixedSizeListArray.from_arrays(flat, arr.shape[1]))
        fields.append(pa.field(key, columns[-1].type))
    columns.append(pa.array(t.episode.astype(np.int64)))
    fields.append(pa.field("episode", pa.int64()))
    meta = {"invdyn.stats": json.dumps(t.stats, sort_keys=True), "invdyn.name": t.name}
    batch = pa.record_batch(columns, schema=pa.schema(fields, metadata=meta))
    path = Path(path)
    with atomic_file(path) as f, pa.ipc.new_file(f, batch.schema) as writer:
        writer.write_batch(batch)
    return path


def read(path, name: str | None = None) -> Transitions:
    """Memory-map a cached file; arrays are read-only zero-copy views of the map, so a Ray worker that
    loads a large dataset reads no HDF5 and copies nothing until it touches the pages."""
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    out = {}
    for key in _MATRICES:
        if key in table.column_names:
            col = _one_chunk(table, key)
            out[key] = _numpy_view(col.flatten()).reshape(-1, col.type.list_size)
    episode = _numpy_view(_one_chunk(table, "episode"))
    stats = json.loads(meta["invdyn.stats"])
    stats["cache"] = str(path)
    return Transitions(
        name=name or meta.get("invdyn.name", Path(path).stem),
        obs=out["obs"],
        act=out["act"],
        next_obs=out["next_obs"],
        episode=episode,
        qpos=out.get("qpos"),
        qvel=out.get("qvel"),
        stats=stats,
    )


def _one_chunk(table, key: str):
    """The column as one array; `write` makes one record batch, so this is its only chunk (no copy)."""
    col = table.column(key)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _numpy_view(values) -> np.ndarray:
    """Zero-copy, read-only numpy view of a null-free float / int Arrow array.

    (Not `Array.to_numpy`: it imports pandas, ~0.4 s on a worker's first load.)
    """
    import pyarrow as pa

    kind = "f" if pa.types.is_floating(values.type) else "i"
    dtype = np.dtype(f"{kind}{values.type.bit_width // 8}")
    return np.frombuffer(
        values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize
    )


def is_cached(sha256: str, kind: str = "hdf5") -> bool:
    return cache_path(sha256, kind).is_file()


def lock(sha256: str):
    """A cross-process lock so that many Ray workers preparing the same dataset build its cache once."""
    from filelock import FileLock

    cache_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir() / f".{sha256}.lock"))


def remove_stale(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
