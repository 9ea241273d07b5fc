"""The `--help` text of this repository's command lines, every one in one process (imports shared, so a
dozen CLIs cost one start-up): `python tests/helpers/cli_help.py JSON` with a JSON list of commands
(argv lists from `python`) prints a JSON list, one {"cli", "code", "help", "stderr"} per command.

A command's CLI is `python -m MODULE` or `python SCRIPT.py`, and its argparse subcommand when the first
argument names one (`python -m invdyn fetch URL` -> the help of `python -m invdyn fetch`). Each module or
script runs as `__main__` with `--help`, as the shell would run it, and exits at argparse's help."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_help(target: list[str], sub: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python *target *sub --help`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # runpy: "found in sys.modules after import of package ..."
            try:
                if target[0] == "-m":
                    sys.argv = [target[1], *sub, "--help"]
                    runpy.run_module(target[1], run_name="__main__", alter_sys=True)
                else:
                    script = REPO / target[0]
                    sys.argv = [str(script), *sub, "--help"]
                    sys.path.insert(0, str(script.parent))  # as `python SCRIPT`: its folder first
                    runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails with it
                code, err = 1, io.StringIO(err.getvalue() + f"{type(e).__name__}: {e}")
    finally:
        sys.argv, sys.path = saved_argv, saved_path
    return code, out.getvalue(), err.getvalue()


def subcommands(help_text: str) -> set[str]:
    """The subcommands argparse lists in a usage line: `usage: prog [-h] {list,info,fetch} ...`."""
    usage = help_text.split("\n\n", 1)[0]
    m = re.search(r"\{([\w,-]+)\}", usage)
    return set(m.group(1).split(",")) if m else set()


def cli_of(argv: list[str]) -> tuple[list[str], list[str]]:
    """(target, the rest) of a `python ...` argv: target ["-m", MODULE] or [SCRIPT]."""
    args = argv[1:]
    if args[:1] == ["-m"]:
        return args[:2], args[2:]
    return args[:1], args[1:]


def helps(commands: list[list[str]]) -> list[dict]:
    """One {"cli", "code", "help", "stderr"} per command; each distinct help is run once."""
    cache: dict[tuple[str, ...], tuple[int, str, str]] = {}

    def cached(target: list[str], sub: list[str]) -> tuple[int, str, str]:
        key = (*target, *sub)
        if key not in cache:
            cache[key] = run_help(target, sub)
        return cache[key]

    results = []
    for argv in commands:
        target, rest = cli_of(argv)
        code, text, err = cached(target, [])
        sub = rest[:1] if code == 0 and rest and rest[0] in subcommands(text) else []
        if sub:
            code, text, err = cached(target, sub)
        cli = " ".join(["python", *target, *sub])
        results.append({"cli": cli, "code": code, "help": text, "stderr": err})
    return results


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "120")
    os.chdir(REPO)
    sys.path[0] = str(REPO)  # as `python -m` from the repository's root: not this helpers folder
    real_stdout = sys.stdout
    found = helps(json.loads(sys.argv[1]))
    real_stdout.write(json.dumps(found))
