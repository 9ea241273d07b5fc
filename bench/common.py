"""What every bench script shares: the machine in words, the command that made a table, Markdown tables, and
the cache of finished units (JSON), so an interrupted measurement resumes."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine(note: str = "CPU only") -> str:
    """ "2-core Intel(R) Xeon(R) Processor (avx512f avx512_bf16 amx_bf16 amx_tile), CPU only; python 3.11.7,
    torch 2.13.0": the line every bench table names its machine with."""
    import torch

    from pipeline.machine import cpu_line

    return f"{cpu_line()}, {note}; python {platform.python_version()}, torch {torch.__version__}"


def command(script: str, drop: tuple[str, ...] = ()) -> str:
    """The command line that ran this script (without the flags in `drop`), to print above its table."""
    argv = [shlex.quote(a) for a in sys.argv[1:] if a not in drop]
    return " ".join(["python", script, *argv]).strip()


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


class Cache:
    """Finished units as JSON files under `root` (one per key); `get` returns None for a unit not done."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, *key: str) -> Path:
        *folders, name = key
        return self.root.joinpath(*folders, f"{name}.json")  # not with_suffix: names hold dots ("0.05")

    def get(self, *key: str):
        p = self.path(*key)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, value, *key: str):
        p = self.path(*key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True, default=float))
        tmp.replace(p)
        return value
