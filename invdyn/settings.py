"""Every environment knob and path invdyn and its pipeline read (at call time, never at import), and the
one rule for naming a dataset's model."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: a model name is one path component: letters, digits, '.', '_', '-' (D4RL names fit), and a jumpy model's
#: `@k<k>` suffix (JUMP_RE)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: a jumpy model (a_t = I(s_t, s_{t+k}), k > 1) is `<dataset model name>@k<k>`; '@' never occurs in a
#: dataset's model name, so the suffix cannot be mistaken for part of one
JUMP_RE = re.compile(r"^(?P<base>.+)@k(?P<k>[1-9][0-9]{0,3})$")
_TRUE = {"1", "true", "yes"}


def _env(key: str, default: str = "") -> str:
    return os.environ.get(key, default).strip()


# ------------------------------------------------------------------------------------------ library


def invdyn_home() -> Path:
    """`$INVDYN_HOME`, default `~/.cache/invdyn`: the model cache and the dataset cache live below it."""
    home = _env("INVDYN_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "invdyn"


def model_cache_dir() -> Path:
    """Installed model directories: `$INVDYN_HOME/models/<name>/`."""
    return invdyn_home() / "models"


def cleandiffuser_dir(name: str) -> Path:
    """Where CleanDiffuser keeps a pretrained IDM: `$HOME/.CleanDiffuser/pretrained/invdyn/<name>/`."""
    return Path(os.path.expanduser("~")) / ".CleanDiffuser" / "pretrained" / "invdyn" / name


def is_offline() -> bool:
    """True when `INVDYN_OFFLINE` is 1 / true / yes: nothing may touch the network."""
    return _env("INVDYN_OFFLINE").lower() in _TRUE


#: what `configure` set for this process; None: the environment decides
_CONFIGURED: dict[str, str | None] = {"remote": None, "sha256": None}


def configure(*, remote: str | None = None, sha256: str | None = None) -> None:
    """Set the team remote for this process, over `INVDYN_REMOTE`: a bundle URL (optionally ending in
    `#sha256=<hex>`), a local bundle .zip or a directory of bundles; `sha256` pins a single bundle.
    `configure(remote="")` turns the remote off; `configure()` gives the choice back to the environment."""
    _CONFIGURED.update(remote=remote, sha256=sha256)


def remote() -> tuple[str, str]:
    """(`INVDYN_REMOTE` or what `configure` set, the sha256 pin or ''): where `load(name)` installs a model
    that is not in the cache from ('' when unset)."""
    if _CONFIGURED["remote"] is not None:
        return _CONFIGURED["remote"].strip(), (_CONFIGURED["sha256"] or "").strip().lower()
    return _env("INVDYN_REMOTE"), (_CONFIGURED["sha256"] or "").strip().lower()


# ------------------------------------------------------------------------------------------ datasets


def d4rl_dataset_dir() -> Path:
    """`$D4RL_DATASET_DIR`, default `~/.d4rl/datasets`: where d4rl itself keeps its HDF5 files."""
    return Path(_env("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


def d4rl_mirror() -> str:
    """`$INVDYN_D4RL_MIRROR`: a base URL that replaces D4RL's own host for downloads ('' when unset)."""
    return _env("INVDYN_D4RL_MIRROR").rstrip("/")


def sim_transitions() -> str:
    """`$INVDYN_SIM_TRANSITIONS`: transitions per simulated dataset ('' = the catalog's default)."""
    return _env("INVDYN_SIM_TRANSITIONS")


# ------------------------------------------------------------------------------------------ pipeline


def mlflow_tracking_uri() -> str | None:
    """`$MLFLOW_TRACKING_URI` (MLflow's own variable), or None."""
    return _env("MLFLOW_TRACKING_URI") or None


def mlflow_retries() -> int:
    """`$INVDYN_MLFLOW_RETRIES` (default 6): attempts at a registry operation that fails transiently."""
    return int(_env("INVDYN_MLFLOW_RETRIES") or 6)


def code_version_override() -> str:
    """`$INVDYN_CODE_VERSION`: the code version recorded with a model, instead of the git commit."""
    return _env("INVDYN_CODE_VERSION")


def mlflow_credentials() -> tuple[str, str, str]:
    """(token, username, password) from MLflow's own `MLFLOW_TRACKING_TOKEN` / `_USERNAME` / `_PASSWORD`
    ('' where unset), for the one request the pipeline sends to a server without MLflow's client."""
    return (
        _env("MLFLOW_TRACKING_TOKEN"),
        _env("MLFLOW_TRACKING_USERNAME"),
        _env("MLFLOW_TRACKING_PASSWORD"),
    )


def ray_address() -> str | None:
    """`$RAY_ADDRESS` (Ray's own variable, set by `ray job submit`), or None to start a local Ray."""
    return _env("RAY_ADDRESS") or None


#: Test hook: crash the first attempt of this dataset's first trial (a fault a test cannot cause otherwise).
CRASH_ONCE_ENV = "INVDYN_TEST_CRASH_ONCE"


def crash_once_dataset() -> str:
    return _env(CRASH_ONCE_ENV)


# ------------------------------------------------------------------------------------------ names


def is_valid_name(name) -> bool:
    if not isinstance(name, str):
        return False
    base, _ = split_jump(name)
    return bool(NAME_RE.match(base)) and ".." not in base


def split_jump(name: str) -> tuple[str, int]:
    """(the name without its jump suffix, k): `hopper-medium-v2@k4` -> (`hopper-medium-v2`, 4); a name
    without a suffix (or with `@k1`, which is no jump at all and so never valid) gives k = 1."""
    m = JUMP_RE.match(name)
    if m is None or int(m["k"]) < 2:
        return name, 1
    return m["base"], int(m["k"])


def jump_model_name(dataset: str, jump: int = 1) -> str:
    """The name of a dataset's model trained with `jump` = k (a_t = I(s_t, s_{t+k})): the dataset's model
    name for k = 1, `<that>@k<k>` for k > 1: the job's record, the bundle member, the cache entry, what
    `invdyn.load` takes. In the registry (`invdyn-` + `dataset_model_name` of the record's name) the '@'
    becomes '-' (`invdyn-<name>-k4`): MLflow reads `models:/<name>@...` as an alias, so a registered name
    with '@' breaks `models:/<name>/<version>`."""
    if isinstance(jump, bool) or not isinstance(jump, int) or jump < 1:
        raise ValueError(f"jump must be an integer >= 1, got {jump!r}")
    base = dataset_model_name(split_jump(str(dataset).strip())[0])
    return base if jump == 1 else f"{base}@k{jump}"


def dataset_model_name(dataset: str) -> str:
    """The one name a dataset's model goes by: its folder in a job's output and in the cache, what
    `invdyn.load` takes, and (after `invdyn-`) its registered-model name. Characters outside
    [A-Za-z0-9._-] become '-': `minari:door/expert-v0` -> `minari-door-expert-v0` (and a jumpy model's
    `<name>@k4` -> `<name>-k4`, its registry and job-folder form)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(dataset).strip()).strip("-.")
    return name[:200] or "dataset"
