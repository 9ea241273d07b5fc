"""The device kit's MANIFEST.json: what it holds (wheels, packed datasets, sha256 of each), for which Python,
from which commit, and whether it fits what travels to the GPU machine (64 MiB with the working tree).

    python bench/device/kit_manifest.py write KIT --python 3.12 --datasets a,b   # make_kit.sh
    python bench/device/kit_manifest.py check KIT [--no-wheels]                   # run.sh, before installing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: what the device tool carries in one call: the working tree + carried paths
TRAVEL_LIMIT = 64 * 2**20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def working_tree_bytes() -> int:
    """Bytes of the files the device tool sends besides carried paths: tracked + untracked-not-ignored."""
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def _entries(folder: Path, pattern: str) -> list[dict]:
    return [
        {"file": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.glob(pattern))
    ]


def write(kit: Path, python: str, datasets: list[str]) -> dict:
    wheels, data = _entries(kit / "wheels", "*.whl"), _entries(kit / "data", "*.npz.xz")
    manifest = {
        "python": python if wheels else None,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git("rev-parse", "HEAD").strip() or None,
        "datasets": datasets,
        "wheels": wheels,
        "data": data,
        "kit_bytes": sum(e["bytes"] for e in wheels + data),
    }
    (kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(kit: Path, need_wheels: bool) -> list[str]:
    """Problems that would make run.sh fail later: wrong Python, a missing or changed file."""
    path = kit / "MANIFEST.json"
    if not path.is_file():
        return [f"{path} is missing: build the kit with bench/device/make_kit.sh and carry its folder"]
    manifest = json.loads(path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    problems = []
    if need_wheels and not manifest["wheels"]:
        problems.append(f"{kit} holds no wheels (built with --no-wheels): run with --no-install, or rebuild")
    if need_wheels and manifest["wheels"] and manifest["python"] != here:
        problems.append(
            f"{kit} holds wheels for Python {manifest['python']}, this is Python {here}: "
            f"bench/device/make_kit.sh --python {here}"
        )
    for sub, entries in (("wheels", manifest["wheels"]), ("data", manifest["data"])):
        for e in entries:
            p = kit / sub / e["file"]
            if not p.is_file():
                problems.append(f"{p} is missing (listed in {path}): was the whole kit folder carried?")
            elif sha256(p) != e["sha256"]:
                problems.append(f"{p} differs from its sha256 in {path}: rebuild the kit")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("kit", type=Path)
    w.add_argument("--python", required=True)
    w.add_argument("--datasets", required=True)
    c = sub.add_parser("check")
    c.add_argument("kit", type=Path)
    c.add_argument("--no-wheels", action="store_true", help="the kit's wheels will not be installed")
    args = p.parse_args(argv)
    if args.cmd == "check":
        problems = check(args.kit, need_wheels=not args.no_wheels)
        for line in problems:
            print(f"kit: {line}", file=sys.stderr)
        return 1 if problems else 0
    m = write(args.kit, args.python, [d for d in args.datasets.split(",") if d])
    tree = working_tree_bytes()
    total = tree + m["kit_bytes"]
    mib = 2**20
    print(
        f"kit {args.kit}: {len(m['wheels'])} wheels, {len(m['data'])} datasets, "
        f"{m['kit_bytes'] / mib:.1f} MiB"
    )
    print(
        f"travels with the working tree ({tree / mib:.1f} MiB now): {total / mib:.1f} MiB of "
        f"{TRAVEL_LIMIT / mib:.0f} MiB"
    )
    if total > TRAVEL_LIMIT:
        print("kit: too large to travel: leave out datasets or shrink the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
