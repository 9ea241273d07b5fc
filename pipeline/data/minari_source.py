"""Minari datasets (`minari:<dataset-id>`): finding one on this machine, hashing it, reading it with
minari."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from invdyn._files import sha256_file
from pipeline.data.catalog import DatasetError, DatasetMissingError
from pipeline.data.transitions import Transitions, make_transitions


def minari_source(dataset_id: str) -> Path:
    """The data file of a local Minari dataset (data/main_data.hdf5), with clear errors when it is missing."""
    try:
        from minari.storage import get_dataset_path
    except ImportError:
        raise DatasetError(
            f"minari:{dataset_id} needs the minari package: pip install minari (or invdyn[pipeline])"
        ) from None
    root = Path(get_dataset_path(dataset_id))
    data = root / "data"
    if not data.is_dir():
        raise DatasetMissingError(
            f"Minari dataset {dataset_id!r} is not on this machine (looked in {data}); "
            f"run `minari download {dataset_id}` or set MINARI_DATASETS_PATH"
        )
    main = data / "main_data.hdf5"
    return main if main.is_file() else data


def minari_sha256(source: Path) -> str:
    """sha256 of main_data.hdf5, or of every file of a non-HDF5 Minari data folder (paths and bytes)."""
    if source.is_file():
        return sha256_file(source)
    h = hashlib.sha256()
    for p in sorted(q for q in source.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(source)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _flat(x) -> np.ndarray:
    """Minari observations may be (nested) dicts: concatenate their leaves in sorted key order."""
    if isinstance(x, dict):
        return np.concatenate([_flat(x[k]) for k in sorted(x)], axis=1)
    x = np.asarray(x)
    return x.reshape(len(x), -1)


def read_minari(dataset_id: str, *, sha256: str | None = None) -> Transitions:
    """A Minari dataset via minari itself: each episode has T+1 observations and T actions."""
    source = minari_source(dataset_id)
    import minari

    where = f"minari:{dataset_id} ({source})"
    try:
        ds = minari.load_dataset(dataset_id)
    except Exception as e:  # minari raises several types for broken folders
        raise DatasetError(f"{where}: minari cannot load it ({type(e).__name__}: {e})") from None
    obs, nxt, act, ends = [], [], [], []
    for ep in ds.iterate_episodes():
        o = _flat(ep.observations)
        a = np.asarray(ep.actions).reshape(len(ep.actions), -1)
        if len(o) != len(a) + 1:
            raise DatasetError(
                f"{where}: episode {ep.id} has {len(o)} observations for {len(a)} actions (need T+1)"
            )
        if len(a) == 0:
            continue
        obs.append(o[:-1])
        nxt.append(o[1:])
        act.append(a)
        end = np.zeros(len(a), bool)
        end[-1] = True
        ends.append(end)
    if not obs:
        raise DatasetError(f"{where}: no episodes with steps")
    env_spec = getattr(ds.spec, "env_spec", None)
    stats = {
        "source": str(source),
        "format": "minari",
        "sha256": sha256 or minari_sha256(source),
        "env_id": getattr(env_spec, "id", None),
        "has_next_observations": True,
    }
    obs_a, act_a, nxt_a, end_a = (np.concatenate(x) for x in (obs, act, nxt, ends))
    return make_transitions(
        f"minari:{dataset_id}",
        where,
        obs_a,
        act_a,
        terminals=end_a,
        timeouts=np.zeros(len(obs_a), bool),
        next_obs=nxt_a,
        stats=stats,
    )
