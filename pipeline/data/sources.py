"""One entry point for every dataset the pipeline trains on, and its CLI.

`load_transitions(spec)` takes a catalog name (a D4RL file in $D4RL_DATASET_DIR), a `sim-*` name (simulated
on demand), `minari:<id>` or a path to .hdf5 / .h5 / .parquet, and returns Transitions. The first load
parses the source and writes the Arrow cache (keyed by the source's sha256); later loads, in any process,
memory-map the cache and never open the source.

    python -m pipeline.datasets list [--suite S] [--json]
    python -m pipeline.datasets info NAME_OR_PATH_OR_MINARI_ID [--json]
    python -m pipeline.datasets download NAME...
    python -m pipeline.datasets prepare NAME... [--download] [--no-simulate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from invdyn.errors import InvdynError
from pipeline.data import cache, readers
from pipeline.data.catalog import (
    CATALOG,
    SUITES,
    DatasetError,
    DatasetMissingError,
    d4rl_dir,
    entry_for_file,
    file_path,
    is_path_spec,
    resolve_datasets,
    unknown,
)
from pipeline.data.transitions import Transitions

log = logging.getLogger(__name__)


@dataclass
class Source:
    """Where a spec's data is and how to parse it."""

    name: str
    kind: str  # "hdf5" | "parquet" | "minari"
    path: Path  # the file (for Minari: main_data.hdf5 or the data folder)
    entry: dict | None  # catalog entry the data must match, when known
    minari_id: str | None = None


def locate(spec: str, *, download: bool = False, simulate: bool = True) -> Source:
    """Resolve a spec to its source file, downloading / simulating it when allowed."""
    spec = str(spec).strip()
    if spec.startswith("minari:"):
        dataset_id = spec[len("minari:") :]
        if not dataset_id:
            raise unknown(spec)
        return Source(spec, "minari", readers.minari_source(dataset_id), None, dataset_id)
    entry = CATALOG.get(spec)
    if entry is not None:
        path = file_path(spec)
        if not path.is_file():
            if entry["simulated"]:
                if not simulate:
                    raise DatasetMissingError(
                        f"{spec}: no file at {path} and simulation is off; run `python -m pipeline.simulate {spec}`"
                    )
                _simulate_once(spec, path)
            elif download:
                from pipeline.data.download import download_dataset

                download_dataset(spec)
            else:
                from pipeline.data.download import missing_message

                raise DatasetMissingError(missing_message(spec))
        return Source(spec, "hdf5", path, entry)
    if is_path_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DatasetMissingError(f"dataset file {path} does not exist")
        entry = entry_for_file(path)
        name = entry["name"] if entry else path.stem
        kind = "parquet" if path.suffix.lower() == ".parquet" else "hdf5"
        return Source(name, kind, path, entry)
    raise unknown(spec)


def _simulate_once(name: str, path: Path) -> None:
    """Generate a missing sim-* file; a lock makes concurrent callers (Ray workers) wait for one run."""
    from filelock import FileLock

    from pipeline.sim.simulate import simulate

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        if not path.is_file():
            simulate(name, out_dir=path.parent)


def _parse(src: Source, sha256: str | None = None) -> Transitions:
    if src.kind == "minari":
        return readers.read_minari(src.minari_id, sha256=sha256)
    read = readers.read_parquet if src.kind == "parquet" else readers.read_hdf5
    return read(src.path, name=src.name, expect=src.entry, sha256=sha256)


def _check_entry(src: Source, t: Transitions) -> None:
    """A cache hit must satisfy the same catalog dims a fresh parse checks."""
    e = src.entry
    if e and (t.obs_dim, t.act_dim) != (e["obs_dim"], e["act_dim"]):
        raise DatasetError(
            f"{src.path}: has obs/act dims {t.obs_dim}/{t.act_dim} but {e['name']} has {e['obs_dim']}/"
            f"{e['act_dim']} in the catalog; the file is not that dataset (delete it and download again)"
        )


def load_transitions(
    spec: str, *, download: bool = False, simulate: bool = True, use_cache: bool = True
) -> Transitions:
    """Transitions for `spec`, from the Arrow cache when the source is unchanged (see module doc).

    Arrays that come from the cache are read-only views of a memory map: copy one before changing it.
    """
    src = locate(spec, download=download, simulate=simulate)
    if not use_cache:
        return _finish(_parse(src), src)
    # a file (D4RL, sim, yours, Minari's main_data.hdf5) goes through the source index; a folder is hashed
    sha = cache.source_sha256(src.path) if src.path.is_file() else readers.minari_sha256(src.path)
    path = cache.cache_path(sha, src.kind)
    t = _read_cache(path, src)
    if t is None:
        try:
            t = _build_cache(src, sha, path)
        except OSError as e:  # read-only or full $INVDYN_HOME: still usable, just parsed every time
            log.warning("cannot write the dataset cache %s (%s); using %s without a cache", path, e, src.name)
            t = _finish(_parse(src, sha), src)
    return t


def _build_cache(src: Source, sha: str, path: Path) -> Transitions:
    """Parse and write the cache once, even when many processes (Ray workers) ask at the same time."""
    with cache.lock(sha):
        t = _read_cache(path, src)
        if t is None:
            cache.write(_finish(_parse(src, sha), src), path)
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


def _finish(t: Transitions, src: Source) -> Transitions:
    t.name = src.name
    t.stats["source"] = str(src.path.resolve())
    if src.entry and not t.stats.get("env_id"):
        t.stats["env_id"] = src.entry.get("env_id")
    if src.entry and "env_kwargs" not in t.stats and "env_kwargs" in src.entry:
        t.stats["env_kwargs"] = src.entry["env_kwargs"]
    return t


def _info(t: Transitions, spec: str) -> dict:
    entry = CATALOG.get(t.name) or {}
    keep = (
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
    info = {"name": t.name, "spec": spec}
    info.update({k: t.stats[k] for k in keep if k in t.stats})
    info["has_qpos"] = t.qpos is not None
    info.update({k: entry[k] for k in ("domain", "url", "simulated") if k in entry})
    return info


def prepare(spec: str, *, download: bool = False, simulate: bool = True, use_cache: bool = True) -> dict:
    """Make sure `spec` is on disk and cached; returns its info (incl. `cache`, the Arrow file's path)."""
    t = load_transitions(spec, download=download, simulate=simulate, use_cache=use_cache)
    return _info(t, spec)


def dataset_info(spec: str, *, download: bool = False, simulate: bool = True) -> dict:
    """What `info --json` prints: transitions, episodes, dims, action range, sha256, source, cache, env_id."""
    return prepare(spec, download=download, simulate=simulate)


def status(name: str) -> tuple[str, int | None]:
    """(cached | present | missing, file size) of a catalog dataset, without hashing or parsing anything."""
    path = file_path(name)
    if not path.is_file():
        return "missing", None
    sha = cache.known_sha256(path, strict=False)
    return ("cached" if sha and cache.is_cached(sha) else "present"), path.stat().st_size


# ----------------------------------------------------------------------------------------------- CLI


def _cmd_list(args) -> int:
    names = SUITES[args.suite] if args.suite else list(CATALOG)
    rows = []
    for name in names:
        e = CATALOG[name]
        state, size = status(name)
        if state == "missing" and e["simulated"]:
            state = "missing (simulated on demand)"
        rows.append(
            {
                "name": name,
                "domain": e["domain"],
                "obs_dim": e["obs_dim"],
                "act_dim": e["act_dim"],
                "size_mb": None if size is None else round(size / 1e6, 1),
                "status": state,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'domain':<8} {'obs':>4} {'act':>4} {'size':>9}  status")
    for r in rows:
        size = "-" if r["size_mb"] is None else f"{r['size_mb']:.1f} MB"
        print(
            f"{r['name']:<{width}}  {r['domain']:<8} {r['obs_dim']:>4} {r['act_dim']:>4} {size:>9}  {r['status']}"
        )
    print(f"\n{len(rows)} datasets; files in {d4rl_dir()}, cache in {cache.cache_dir()}")
    return 0


def _cmd_info(args) -> int:
    info = dataset_info(args.spec, download=args.download, simulate=not args.no_simulate)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v}")
    return 0


def _cmd_download(args) -> int:
    from pipeline.data.download import download_dataset

    failed = 0
    for name in resolve_datasets(",".join(args.names)):
        if CATALOG.get(name, {}).get("simulated"):
            print(f"{name}: simulated on demand, nothing to download", file=sys.stderr)
            continue
        try:
            print(download_dataset(name, progress=not args.quiet))
        except InvdynError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_prepare(args) -> int:
    from tqdm.auto import tqdm

    failed = 0
    specs = resolve_datasets(",".join(args.names))
    for spec in tqdm(specs, desc="prepare", unit="dataset", disable=len(specs) < 2):
        try:
            info = prepare(spec, download=args.download, simulate=not args.no_simulate)
            tqdm.write(
                f"{info['name']}: {info['transitions']} transitions, {info['episodes']} episodes, "
                f"obs {info['obs_dim']} act {info['act_dim']} -> {info.get('cache', 'not cached')}"
            )
        except InvdynError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.datasets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="catalog datasets with dims, size on disk and present / cached / missing")
    p.add_argument("--suite", choices=sorted(SUITES))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="transitions, episodes, dims, sha256 of one dataset (prepares its cache)")
    p.add_argument("spec", metavar="NAME_OR_PATH_OR_MINARI_ID")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--download", action="store_true", help="download a missing D4RL file")
    p.add_argument("--no-simulate", action="store_true", help="do not generate a missing sim-* dataset")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("download", help="download D4RL files by name or suite")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_download)
    p = sub.add_parser("prepare", help="parse datasets once into the Arrow cache (names, suites, paths)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--download", action="store_true", help="download missing D4RL files")
    p.add_argument("--no-simulate", action="store_true", help="do not generate missing sim-* datasets")
    p.set_defaults(func=_cmd_prepare)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except InvdynError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `list | head`
        with contextlib.suppress(Exception):
            sys.stdout.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
