"""What every bench script shares: the machine in words, the command that made a table, Markdown tables, and
the cache of finished units (JSON), so an interrupted measurement resumes; the shared flags (--out, --threads,
--work) and the record's header."""

from __future__ import annotations

import argparse
import json
import os
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


# ------------------------------------------------------------- the flags and the record every bench shares


def parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's command line: its docstring's first paragraph as the description, the rest (the
    commands it is run with, what it measures) shown after the flags by --help."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(
        description=head, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _shown(path) -> str:
    """A default path as --help shows it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def add_out(ap: argparse.ArgumentParser, default, what: str = "the Markdown record it writes") -> None:
    """--out FILE: where the script's Markdown goes ('-' prints it only)."""
    shown = "'-': print it only" if str(default) == "-" else f"default {_shown(default)}; '-' prints it only"
    ap.add_argument("--out", default=str(default), help=f"{what} ({shown})")


def add_threads(ap: argparse.ArgumentParser, default: int | None = None) -> None:
    """--threads N: torch threads of every training the bench runs."""
    shown = "the CPUs this process was given" if default is None else default
    ap.add_argument("--threads", type=int, default=default, help=f"torch threads (default: {shown})")


def add_work(ap: argparse.ArgumentParser, default, what: str = "models, data and cached results") -> None:
    """--work DIR: the bench's own folder (what it trains, simulates and caches; reused by a rerun)."""
    ap.add_argument("--work", default=str(default), help=f"{what} (default {_shown(default)})")


def device_note(device: str = "cpu") -> str:
    """The second half of `machine`'s line: "CPU only", or the GPU's name."""
    if device != "cuda":
        return "CPU only"
    import torch

    return f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no CUDA device found"


def load_note() -> str:
    """ "load average 1.3 on 2 CPUs at start": how busy the machine was (a shared one slows every timing)."""
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "unknown"
    return f"load average {load} on {os.cpu_count()} CPUs at start"


def header(title: str, script: str, note: str, drop: tuple[str, ...] = ()) -> list[str]:
    """The lines every record opens with: its title, the command that wrote it, the machine it ran on."""
    return ["# " + title, "", "```bash", command(script, drop), "```", "", f"Machine: {machine(note)}.", ""]


def write_record(lines: list[str], out: str) -> str:
    """Print the record and write it to `out` (unless '-'); the text written."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text, end="", flush=True)
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    return text


def measured_on(records: list[dict], note: str = "CPU only") -> str:
    """Where cached results were measured: the `machine` lines the records hold (one each, written when it
    was measured), or this machine's line, marked as such, where records name none."""
    named = list(dict.fromkeys(r["machine"] for r in records if r.get("machine")))
    unnamed = sum(not r.get("machine") for r in records)
    if unnamed or not named:
        where = f" (where this record was written; {unnamed} result(s) named no machine)" if unnamed else ""
        named.append(machine(note) + where)
    return "; ".join(named)
