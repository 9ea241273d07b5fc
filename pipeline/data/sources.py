"""Spec -> source -> Transitions: the registry of source kinds and `load_transitions`, the one entry point
for every dataset the pipeline trains on (the first load fills the Arrow cache, later loads map it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from invdyn.errors import InvdynError
from pipeline.data import cache, minari_source, readers
from pipeline.data.catalog import (
    CATALOG,
    DatasetError,
    DatasetMissingError,
    entry_for_file,
    file_path,
    is_path_spec,
    unknown,
)
from pipeline.data.transitions import Transitions

log = logging.getLogger(__name__)

MINARI_PREFIX = "minari:"


@dataclass
class Source:
    """Where a spec's data is and which kind of source reads it."""

    name: str  # the dataset's name: catalog name, `minari:<id>`, or a file's stem
    kind: str  # a key of KINDS
    path: Path  # the file (for Minari: main_data.hdf5 or the data folder)
    entry: dict | None  # catalog entry the data must match, when known
    minari_id: str | None = None


@dataclass(frozen=True)
class SourceKind:
    """How one kind of source becomes Transitions, and how a generated catalog file is made when missing."""

    read: Callable[[Source, str | None], Transitions]  # (source, sha256 of its bytes when known)
    cache_tag: str  # the parser's name in the cache file's name: kinds that parse bytes alike share it
    suffixes: tuple[str, ...] = ()  # a path spec with one of these suffixes is read by this kind
    make: Callable[[str, Path], object] | None = None  # (catalog name, path): write the missing file
    check: Callable[[Source], None] | None = None  # raises when a present file may not be used (cache or not)


def _read_hdf5(src: Source, sha256: str | None) -> Transitions:
    return readers.read_hdf5(src.path, name=src.name, expect=src.entry, sha256=sha256)


def _read_parquet(src: Source, sha256: str | None) -> Transitions:
    return readers.read_parquet(src.path, name=src.name, expect=src.entry, sha256=sha256)


def _read_minari(src: Source, sha256: str | None) -> Transitions:
    return minari_source.read_minari(src.minari_id, sha256=sha256)


#: Source kinds by name. A catalog entry names its kind ("kind"); a path spec gets the kind of its suffix
#: (hdf5 when none matches); `minari:<id>` is "minari". Adding a kind: write its reader and add it here,
#: or call `register_kind` from the package that provides it (pipeline.sim adds "simulated" that way).
KINDS: dict[str, SourceKind] = {
    "hdf5": SourceKind(read=_read_hdf5, cache_tag="hdf5", suffixes=(".hdf5", ".h5")),
    "parquet": SourceKind(read=_read_parquet, cache_tag="parquet", suffixes=(".parquet",)),
    "minari": SourceKind(read=_read_minari, cache_tag="minari"),
}


def register_kind(name: str, kind: SourceKind) -> None:
    """Add (or replace) a source kind; catalog entries with `"kind": name` are then read by it."""
    KINDS[name] = kind


def _kind(name: str) -> SourceKind:
    try:
        return KINDS[name]
    except KeyError:
        raise DatasetError(
            f"no source kind {name!r} is registered (known: {', '.join(KINDS)}); the package that "
            "provides it registers it when imported (e.g. pipeline.sim for 'simulated')"
        ) from None


def locate(spec: str, *, download: bool = False, simulate: bool = True, fetch: bool = True) -> Source:
    """Resolve a spec to its source, downloading a missing D4RL file / generating a missing simulated one
    when allowed (with `fetch` False: only raising when that would not be allowed)."""
    spec = str(spec).strip()
    if spec.startswith(MINARI_PREFIX):
        dataset_id = spec[len(MINARI_PREFIX) :]
        if not dataset_id:
            raise unknown(spec)
        return Source(spec, "minari", minari_source.minari_source(dataset_id), None, dataset_id)
    entry = CATALOG.get(spec)
    if entry is not None:
        path = file_path(spec)
        if not path.is_file():
            _fetch_missing(spec, entry, path, download=download, simulate=simulate, fetch=fetch)
        return Source(spec, entry["kind"], path, entry)
    if is_path_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DatasetMissingError(f"dataset file {path} does not exist")
        entry = entry_for_file(path)
        suffix = path.suffix.lower()
        kind = next((k for k, v in KINDS.items() if suffix in v.suffixes), "hdf5")
        return Source(entry["name"] if entry else path.stem, kind, path, entry)
    raise unknown(spec)


def _fetch_missing(
    name: str, entry: dict, path: Path, *, download: bool, simulate: bool, fetch: bool = True
) -> None:
    """Put a catalog dataset's missing file in place: generate it (its kind has `make`) or download it."""
    make = _kind(entry["kind"]).make
    if make is not None:
        if not simulate:
            raise DatasetMissingError(
                f"{name}: no file at {path} and simulation is off; run `python -m pipeline.simulate {name}`"
            )
        if fetch:
            make(name, path)
        return
    from pipeline.data.download import download_dataset, missing_message

    if not download:
        raise DatasetMissingError(missing_message(name))
    if fetch:
        download_dataset(name)


#: How many unavailable datasets an error lists one by one.
SHOWN_MISSING = 5


def check_available(specs: list[str], *, download: bool = False, simulate: bool = True) -> None:
    """Raise the error `load_transitions` would raise for each dataset that is not there and may not be
    made, in one DatasetError naming each with its fix; generates, downloads or parses nothing, so a
    command checks its datasets this way before any long work."""
    problems = []
    for spec in specs:
        try:
            locate(spec, download=download, simulate=simulate, fetch=False)
        except InvdynError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise DatasetError(problems[0])
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:SHOWN_MISSING])
        if len(problems) > SHOWN_MISSING:
            listed += (
                f"\n  ... and {len(problems) - SHOWN_MISSING} more "
                "(`python -m pipeline.datasets list` shows what is on disk)"
            )
        raise DatasetError(f"{len(problems)} of the {len(specs)} datasets are not available:\n{listed}")


def load_transitions(
    spec: str, *, download: bool = False, simulate: bool = True, use_cache: bool = True
) -> Transitions:
    """Transitions for `spec`: parsed once into the Arrow cache (keyed by the source's sha256), later
    memory-mapped from it in any process without opening the source.

    Arrays that come from the cache are read-only views of a memory map: copy one before changing it.
    """
    src = locate(spec, download=download, simulate=simulate)
    kind = _kind(src.kind)
    if kind.check is not None:
        kind.check(src)
    if not use_cache:
        return _finish(kind.read(src, None), src)
    # a file (D4RL, sim, yours, Minari's main_data.hdf5) goes through the source index; a folder is hashed
    sha = cache.source_sha256(src.path) if src.path.is_file() else minari_source.minari_sha256(src.path)
    path = cache.cache_path(sha, kind.cache_tag)
    t = _read_cache(path, src)
    if t is None:
        try:
            t = _build_cache(src, kind, sha, path)
        except OSError as e:  # read-only or full $INVDYN_HOME: still usable, just parsed every time
            log.warning("cannot write the dataset cache %s (%s); using %s without a cache", path, e, src.name)
            t = _finish(kind.read(src, sha), src)
    return t


def _build_cache(src: Source, kind: SourceKind, sha: str, path: Path) -> Transitions:
    """Parse and write the cache once, even when many processes (Ray workers) ask at the same time."""
    with cache.lock(sha):
        t = _read_cache(path, src)
        if t is None:
            cache.write(_finish(kind.read(src, sha), src), path)
            t = _read_cache(path, src)
            t.stats["cache_hit"] = False
    return t


def _read_cache(path: Path, src: Source) -> Transitions | None:
    if not path.is_file():
        return None
    try:
        t = cache.read(path, name=src.name)
    except (OSError, ValueError, KeyError):  # a damaged cache file is rebuilt, never trusted
        cache.remove_stale(path)
        return None
    _check_entry(src, t)
    t.stats["cache_hit"] = True
    return _finish(t, src)


def _check_entry(src: Source, t: Transitions) -> None:
    """A cache hit must satisfy the same catalog dims a fresh parse checks."""
    e = src.entry
    if e and (t.obs_dim, t.act_dim) != (e["obs_dim"], e["act_dim"]):
        raise DatasetError(
            f"{src.path}: has obs/act dims {t.obs_dim}/{t.act_dim} but {e['name']} has {e['obs_dim']}/"
            f"{e['act_dim']} in the catalog; the file is not that dataset (delete it and download again)"
        )


def _finish(t: Transitions, src: Source) -> Transitions:
    t.name = src.name
    t.stats["source"] = str(src.path.resolve())
    if src.entry and not t.stats.get("env_id"):
        t.stats["env_id"] = src.entry.get("env_id")
    if src.entry and "env_kwargs" not in t.stats and "env_kwargs" in src.entry:
        t.stats["env_kwargs"] = src.entry["env_kwargs"]
    return t


#: what `prepare` (and `python -m pipeline.datasets info`) reports of a dataset, besides name and spec
INFO_KEYS = (
    "source",
    "format",
    "sha256",
    "transitions",
    "episodes",
    "obs_dim",
    "act_dim",
    "act_min",
    "act_max",
    "env_id",
    "env_kwargs",
    "cache",
    "dropped_nonfinite",
    "has_next_observations",
    "policy",
    "seed",
)


def prepare(spec: str, *, download: bool = False, simulate: bool = True, use_cache: bool = True) -> dict:
    """Make sure `spec` is on disk and cached; returns its info (incl. `cache`, the Arrow file's path)."""
    t = load_transitions(spec, download=download, simulate=simulate, use_cache=use_cache)
    entry = CATALOG.get(t.name) or {}
    info = {"name": t.name, "spec": spec}
    info.update({k: t.stats[k] for k in INFO_KEYS if k in t.stats})
    info["has_qpos"] = t.qpos is not None
    info.update({k: entry[k] for k in ("domain", "url", "simulated") if k in entry})
    return info
