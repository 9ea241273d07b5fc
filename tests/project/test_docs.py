"""The README and the user guide against the code: every `python -m ...` / `python SCRIPT.py` command they
show (bash blocks, inline spans, bench/README.md's table) uses only long flags its --help lists, every page
of mkdocs.yml's nav exists, and the README stays a front page that opens with the two set-up lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache

import pytest
import yaml
from helpers.doc_commands import REPO, doc_commands, doc_pages, flags, inline_python_commands

# `python -m X` for X outside this repository: the README's test command runs pytest
EXTERNAL_MODULES = {"pytest"}
# a command whose flags do not exist: the negative test's, checked in the same batch as the docs' own
MADE_UP = [
    ["python", "-m", "pipeline.train", "--dataset", "x", "--out", "y", "--no-such-flag", "1"],
    ["python", "-m", "invdyn", "fetch", "bundle.zip", "--source", "d"],  # --source is `info`'s, not `fetch`'s
]


def repo_cli(argv: list[str]) -> bool:
    """Whether a `python ...` command runs a module or script of this repository (else an allowed one)."""
    args = argv[1:]
    if args[:1] == ["-m"]:
        module = args[1]
        path = REPO / module.replace(".", "/")
        if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file():
            return True
        assert module in EXTERNAL_MODULES, f"`python -m {module}`: no such module here (nor a known tool)"
        return False
    assert args and args[0].endswith(".py"), f"not a `python -m MODULE` or `python SCRIPT.py`: {argv}"
    assert (REPO / args[0]).is_file(), f"`python {args[0]}`: no such script"
    return True


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every repository command the README, the guide and bench/README.md show."""
    pages = [*doc_pages(), REPO / "bench" / "README.md"]
    shown = [(w, a) for w, a in doc_commands() if a[0] in ("python", "python3")]
    shown += inline_python_commands(pages)
    return [(w, a) for w, a in shown if repo_cli(a)]


@cache
def help_texts(commands: tuple[tuple[str, ...], ...]) -> dict[tuple[str, ...], dict]:
    """Each command's CLI and its --help, from one process running every distinct --help once."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "cli_help.py"), json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(commands, json.loads(proc.stdout), strict=True))


def all_help_texts() -> dict[tuple[str, ...], dict]:
    argvs = sorted({tuple(a) for _, a in shown_commands()} | {tuple(a) for a in MADE_UP})
    return help_texts(tuple(argvs))


def check_flags(argv: list[str], where: str) -> str:
    """The CLI `argv` runs; fails unless its --help ran and lists every long flag `argv` uses."""
    found = all_help_texts()[tuple(argv)]
    assert found["code"] == 0 and "usage:" in found["help"], (
        f"{where}: `{found['cli']} --help` failed: {found['stderr'][-2000:]}"
    )
    for f in flags(argv):
        assert re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", found["help"]), (
            f"{where}: `{found['cli']}` has no {f} (not in its --help): {' '.join(argv)}"
        )
    return found["cli"]


def test_every_command_the_guide_shows_uses_flags_that_exist():
    shown = shown_commands()
    checked = {check_flags(argv, where) for where, argv in shown}
    # the extraction found the guide's doors (an empty or broken extraction would pass vacuously)
    for cli in (
        "python -m invdyn fetch",
        "python -m invdyn list",
        "python -m invdyn export-onnx",
        "python -m pipeline.train",
        "python -m pipeline.pretrain_all",
        "python -m pipeline.evaluate",
        "python -m pipeline.datasets list",
        "python -m pipeline.simulate",
        "python -m pipeline.report",
        "python -m pipeline.register",
        "python bench/accuracy_table.py",
        "python tools/mlflow_screenshots.py",
    ):
        assert cli in checked, f"no `{cli}` command found in the docs: {sorted(checked)}"
    assert len(shown) > 60, len(shown)


def test_a_made_up_flag_is_caught():
    with pytest.raises(AssertionError, match=r"`python -m pipeline.train` has no --no-such-flag"):
        check_flags(MADE_UP[0], "here")
    with pytest.raises(AssertionError, match=r"`python -m invdyn fetch` has no --source"):
        check_flags(MADE_UP[1], "here")
    with pytest.raises(AssertionError, match="no such script"):
        repo_cli(["python", "bench/no_such_bench.py", "--out", "x"])
    with pytest.raises(AssertionError, match="no such module"):
        repo_cli(["python", "-m", "pipeline.no_such_module"])


def nav_pages(nav) -> list[str]:
    """The Markdown files a mkdocs nav names, at any depth."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return [p for item in nav for p in nav_pages(item)]


def test_every_nav_page_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert "index.md" in pages and "api.md" in pages, pages

    # docs/hooks.py renders the bench records, bench/README.md among them, as pages under bench/
    def exists(page: str) -> bool:
        return (REPO / "docs" / page).is_file() or (page.startswith("bench/") and (REPO / page).is_file())

    missing = [p for p in pages if not exists(p)]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"


def test_the_readme_is_a_front_page_that_opens_with_the_two_set_up_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines: move the detail into docs/"
    assert lines[:2] == ["# invdyn", ""] and lines[2] == "```bash" and lines[5] == "```", lines[:6]
    assert lines[3] == (
        'pip install torch==2.13.0 && pip install -e ".[pipeline]" && '
        "python -m pipeline.pretrain_all --export invdyn-bundle.zip"
    )
    assert lines[4] == 'pip install torch==2.13.0 && pip install -e ".[test,bench]" && python -m pytest'
    # and .ci/run runs that test command
    assert "\npython -m pytest\n" in (REPO / ".ci" / "run").read_text()
