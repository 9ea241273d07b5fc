"""A venv on this machine that has only what the GPU machine's image has: the packages of this venv whose
names are in gpu_image_packages.txt, linked in (no copies, no downloads). run.sh under its python finds
Ray, jsonschema, pydantic, MLflow, gymnasium and MuJoCo missing, as on the GPU machine, so a local
`run.sh --device cpu --quick` with a `make_kit.sh --python 3.11` kit checks that the kit holds every
package the run imports.

    python bench/device/bare_env.py /tmp/bare    # then PYTHON=/tmp/bare/bin/python bench/device/run.sh ...
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

LIST = Path(__file__).with_name("gpu_image_packages.txt")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = LIST.read_text().splitlines()
    return {normalized(x) for x in lines if x.strip() and not x.startswith("#")}


def top_level_paths(dist: metadata.Distribution, site: Path) -> set[Path]:
    """The first path component under site-packages of every file the distribution installed."""
    tops = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__") and (site / parts[0]).exists():
            tops.add(site / parts[0])
    return tops


def build(target: Path) -> tuple[int, list[str]]:
    site = Path(sysconfig.get_paths()["purelib"])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(target)], check=True)
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    dst = target / "lib" / py / "site-packages"
    wanted = image_packages()
    linked, left_out = 0, []
    for dist in metadata.distributions(path=[str(site)]):
        name = normalized(dist.metadata["Name"])
        if name not in wanted:
            left_out.append(name)
            continue
        for src in top_level_paths(dist, site):
            link = dst / src.name
            if not link.exists():
                link.symlink_to(src)
                linked += 1
    return linked, sorted(left_out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", type=Path)
    args = p.parse_args(argv)
    linked, left_out = build(args.target)
    print(f"{args.target}: {linked} paths linked; left out (not in the GPU image): {', '.join(left_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
