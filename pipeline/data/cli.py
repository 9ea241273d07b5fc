"""`python -m pipeline.datasets list|info|download|prepare`: the catalog with what is on disk, one dataset's
facts, D4RL downloads, and filling the Arrow cache ahead of a job."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from invdyn.errors import InvdynError
from pipeline.data import cache
from pipeline.data.catalog import CATALOG, SUITES, d4rl_dir, file_path, resolve_datasets
from pipeline.data.sources import check_available, load_transitions, prepare


def status(name: str) -> tuple[str, int | None]:
    """(cached | present | missing, file size) of a catalog dataset, without hashing or parsing anything."""
    path = file_path(name)
    if not path.is_file():
        return "missing", None
    sha = cache.known_sha256(path, strict=False)
    # every catalog file is D4RL-layout HDF5 (downloaded or simulated): is_cached's default reader
    return ("cached" if sha and cache.is_cached(sha) else "present"), path.stat().st_size


def _cmd_list(args) -> int:
    names = SUITES[args.suite] if args.suite else list(CATALOG)
    rows = []
    for name in names:
        e = CATALOG[name]
        state, size = status(name)
        if state == "missing" and e["simulated"]:
            state = "missing (simulated on demand)"
        size_mb = None if size is None else round(size / 1e6, 1)
        rows.append(
            {
                "name": name,
                "domain": e["domain"],
                "obs_dim": e["obs_dim"],
                "act_dim": e["act_dim"],
                "size_mb": size_mb,
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
        dims = f"{r['obs_dim']:>4} {r['act_dim']:>4}"
        print(f"{r['name']:<{width}}  {r['domain']:<8} {dims} {size:>9}  {r['status']}")
    print(f"\n{len(rows)} datasets; files in {d4rl_dir()}, cache in {cache.cache_dir()}")
    return 0


def _cmd_info(args) -> int:
    from pathlib import Path

    from pipeline.data.facts import dataset_facts, facts_table

    info = prepare(args.spec, download=args.download, simulate=not args.no_simulate)
    t = load_transitions(args.spec, download=args.download, simulate=not args.no_simulate)
    facts = dataset_facts(t, Path(info["source"]) if info.get("source") else None)
    if args.json:
        print(json.dumps(info | facts, sort_keys=True))
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v}")
        print()
        print("\n".join(facts_table(facts)))
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
    # every dataset is on disk or may be made, before the first one is simulated / parsed
    check_available(specs, download=args.download, simulate=not args.no_simulate)
    # a bar only on a terminal (tqdm's disable=None): a log file gets the lines, not the frames
    for spec in tqdm(specs, desc="prepare", unit="dataset", disable=True if len(specs) < 2 else None):
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


def parser() -> argparse.ArgumentParser:
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
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
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
