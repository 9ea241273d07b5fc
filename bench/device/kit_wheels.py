"""Wheels in the device kit: Ray's wheel repacked without the files a Python-only local Ray never reads
(`ray/jars/`: Java workers, 33 MB; RLlib, Ray LLM and Ray Serve, whose own dependencies are not installed
anyway, and which Tune imports only inside a try; the dashboard's web client, which only the dashboard
serves, and the job starts Ray without it), its RECORD fixed to match.

    python bench/device/kit_wheels.py repack SRC.whl DST_DIR      # DST_DIR/<same file name>
    python bench/device/kit_wheels.py check WHEEL                 # RECORD lists the files, hashes right
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import sys
import zipfile
from pathlib import Path

#: prefixes and suffixes of the members left out of Ray's wheel
DROP_PREFIXES = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/serve/", "ray/dashboard/client/")
DROP_SUFFIXES = (".js.map",)


def dropped(name: str) -> bool:
    return name.startswith(DROP_PREFIXES) or name.endswith(DROP_SUFFIXES)


def _record_name(names: list[str]) -> str:
    records = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise SystemExit(f"expected one <name>.dist-info/RECORD in the wheel, found {records}")
    return records[0]


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(src: Path, dst_dir: Path) -> dict:
    """Copy `src` to `dst_dir` (same file name, which pip reads the tags from) without the dropped members;
    every other member keeps its bytes and its ZipInfo (the executable bits of raylet and gcs_server)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    removed = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record = _record_name(zin.namelist())
        for info in zin.infolist():
            if info.filename == record:
                continue
            if dropped(info.filename):
                removed.append(info.filename)
                continue
            data = zin.read(info.filename)
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data, compresslevel=9)
        rows = [r for r in csv.reader(io.StringIO(zin.read(record).decode())) if r and r[0] not in removed]
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        zout.writestr(zin.getinfo(record), out.getvalue().encode())
    return {"wheel": dst.name, "removed": len(removed), "bytes": dst.stat().st_size}


def check(wheel: Path) -> list[str]:
    """Problems with a wheel's RECORD: a member it does not list, a listed file missing, a wrong hash."""
    problems = []
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        record = _record_name(names)
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record).decode())) if r}
        for name in names:
            row = rows.pop(name, None)
            if row is None:
                problems.append(f"{name}: not in RECORD")
            elif name != record and row[1] != _digest(z.read(name)):
                problems.append(f"{name}: hash differs from RECORD")
        problems += [f"{name}: in RECORD, not in the wheel" for name in rows]
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("repack", help="SRC.whl -> DST_DIR/SRC.whl without the members listed above")
    rp.add_argument("src", type=Path)
    rp.add_argument("dst_dir", type=Path)
    ck = sub.add_parser("check", help="RECORD matches the wheel's members")
    ck.add_argument("wheel", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "repack":
        info = repack(args.src, args.dst_dir)
        print(f"{info['wheel']}: {info['removed']} members left out, {info['bytes'] / 2**20:.1f} MiB")
        return 0
    problems = check(args.wheel)
    for line in problems[:20]:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
