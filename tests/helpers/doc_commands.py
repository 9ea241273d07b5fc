"""The commands the README and the user guide show: bash blocks and inline `python ...` spans of README.md,
docs/**/*.md and bench/README.md, split into argv lists as the shell would (tests/project/test_cluster_yaml.py
and tests/project/test_docs.py check them against today's CLIs)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell text, as argv lists: continuation lines joined, comments dropped,
    `$(...)` one word, split at ; && || | & ( ), redirections and their targets dropped, leading VAR=value
    words and `nohup` dropped. Enough for the commands of cluster.yaml and of the docs."""
    script = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", script.replace("\\\n", " "))
    commands = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        current, skip = [], False
        for tok in lex:
            if skip:
                skip = False
            elif tok and set(tok) <= set("();<>|&"):
                if "<" in tok or ">" in tok:  # a redirection: its target is no argument
                    skip = True
                    if current and current[-1].isdigit():  # the fd of `2>&1`
                        current.pop()
                else:
                    commands.append(current)
                    current = []
            else:
                current.append(tok)
        commands.append(current)
    out = []
    for argv in commands:
        while argv and (re.fullmatch(r"[A-Za-z_]+=.*", argv[0]) or argv[0] in ("nohup", "sudo")):
            argv = argv[1:]
        if argv[:1] == ["nice"]:  # `nice -n 10 python ...`: the command is what nice runs
            argv = argv[3:] if argv[1:2] == ["-n"] else argv[1:]
        if argv:
            out.append(argv)
    return out


def flags(argv: list[str]) -> list[str]:
    """The long options of `argv` (`--x=y` -> `--x`; an optional one shown as `[--x` -> `--x`), up to a `--`
    that ends them."""
    found = []
    for a in argv:
        if a == "--":
            break
        m = re.match(r"\[?(--[A-Za-z0-9][\w-]*)", a)
        if m:
            found.append(m.group(1))
    return found


def doc_pages() -> list[Path]:
    """README.md and every page of the guide (docs/**/*.md)."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash (or sh, shell) fenced blocks of a Markdown text."""
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S)


def doc_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every command in the bash blocks of README.md and docs/**.md."""
    found = []
    for page in doc_pages():
        for block in bash_blocks(page.read_text()):
            found += [(page.relative_to(REPO).as_posix(), argv) for argv in shell_commands(block)]
    return found


def inline_python_commands(pages: list[Path]) -> list[tuple[str, list[str]]]:
    """(page, argv) of every inline code span outside fenced blocks that is a `python ...` command (one span
    may wrap over lines), e.g. `python -m pipeline.train --jump 4`, `nice -n 10 python bench/x.py` or
    `pip install -e ".[screenshots]" && python tools/mlflow_screenshots.py`."""
    found = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for span in re.findall(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", text):
            span = " ".join(span.split())
            if not re.search(r"(^|[;&|(] *)(nice -n \d+ )?python3? ", span):
                continue
            where = page.relative_to(REPO).as_posix()
            found += [(where, argv) for argv in shell_commands(span) if argv[0].startswith("python")]
    return found
