"""Where invdyn keeps things: `$INVDYN_HOME` (default ~/.cache/invdyn) and its subfolders."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: a model name is one path component: letters, digits, '.', '_', '-' (D4RL names fit)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def invdyn_home() -> Path:
    """`$INVDYN_HOME`, default `~/.cache/invdyn` (read at call time, so tests and users can change it)."""
    home = os.environ.get("INVDYN_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "invdyn"


def model_cache_dir() -> Path:
    """Installed model directories: `$INVDYN_HOME/models/<name>/`."""
    return invdyn_home() / "models"


def is_valid_name(name) -> bool:
    return isinstance(name, str) and bool(NAME_RE.match(name)) and ".." not in name
