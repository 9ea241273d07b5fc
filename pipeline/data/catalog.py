"""Which datasets exist (D4RL's name -> file URL table, the simulated sets and their MuJoCo envs, suites),
and turning a `--datasets` string of names, suites, `minari:<id>` and file paths into dataset specs."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from invdyn.errors import InvdynError
from invdyn.settings import d4rl_dataset_dir


class DatasetError(InvdynError, ValueError):
    """A dataset that cannot be used as given: the message names the file / key / dataset and the fix."""


class UnknownDatasetError(DatasetError, LookupError):
    """A name that is neither in the catalog, nor a suite, nor a path, nor `minari:<id>`."""


class DatasetMissingError(DatasetError, FileNotFoundError):
    """A known dataset whose file is not on disk (the message names the URL and where to put the file)."""


#: Gymnasium MuJoCo envs of the simulated sets: short name -> env id, make() kwargs, obs / act dims.
#: Ant drops the contact-force part of the observation (27 dims = qpos[2:] + qvel): D4RL's 111-dim ant
#: observations are these 27 followed by 84 contact-force dims that D4RL's MuJoCo 2.x left at zero.
SIM_ENVS: dict[str, dict] = {
    "halfcheetah": {"env_id": "HalfCheetah-v5", "env_kwargs": {}, "obs_dim": 17, "act_dim": 6},
    "hopper": {"env_id": "Hopper-v5", "env_kwargs": {}, "obs_dim": 11, "act_dim": 3},
    "walker2d": {"env_id": "Walker2d-v5", "env_kwargs": {}, "obs_dim": 17, "act_dim": 6},
    "ant": {
        "env_id": "Ant-v5",
        "env_kwargs": {"include_cfrc_ext_in_observation": False},
        "obs_dim": 27,
        "act_dim": 8,
    },
}

_TABLE = json.loads((Path(__file__).with_name("d4rl_catalog.json")).read_text())
_D4RL: dict[str, dict] = _TABLE["datasets"]

#: Behaviour policies (implemented in pipeline.sim.policies): uniform random, Ornstein-Uhlenbeck correlated
#: noise, a noisy periodic gait (reaches fast, coordinated motion random never does), and a per-episode mix.
SIM_POLICIES = ("random", "ou", "gait", "mixed")
#: Policy of the `sim` suite: the mix covers the union of the others' states (see README, datasets section).
SIM_SUITE_POLICY = "mixed"
#: D4RL-like kinds made from trained agents (pipeline/sim/agent_weights, from `python -m pipeline.agents`):
#: the medium and expert policies sampled stochastically, the training rollouts up to medium, and the union
#: of medium and expert. Only the locomotion envs with committed agents have them.
AGENT_KINDS = ("medium", "medium-replay", "expert", "medium-expert")
AGENT_ENVS = ("halfcheetah", "hopper", "walker2d")
#: Transitions a `sim-*` dataset gets when it is generated on demand (3 of them train in minutes on 2 cores).
DEFAULT_SIM_TRANSITIONS = 50_000


def sim_name(env: str, policy: str) -> str:
    return f"sim-{env}-{policy}-v0"


def _catalog() -> dict[str, dict]:
    cat = {name: dict(entry, name=name, kind="hdf5", simulated=False) for name, entry in _D4RL.items()}
    for env, spec in SIM_ENVS.items():
        for policy in SIM_POLICIES + (AGENT_KINDS if env in AGENT_ENVS else ()):
            name = sim_name(env, policy)
            cat[name] = {
                "name": name,
                "url": None,
                "domain": "sim",
                "obs_dim": spec["obs_dim"],
                "act_dim": spec["act_dim"],
                "env_id": spec["env_id"],
                "env_kwargs": spec["env_kwargs"],
                "sim_env": env,
                "policy": policy,
                "kind": "simulated",
                "simulated": True,
            }
    return cat


#: name -> entry: url (None for simulated), domain, obs_dim, act_dim, env_id (Gymnasium id or None),
#: kind (the source kind that reads it, see pipeline.data.sources), simulated
CATALOG: dict[str, dict] = _catalog()

_LOCO = ("halfcheetah", "hopper", "walker2d")
SUITES: dict[str, list[str]] = {
    "mujoco": [
        f"{a}-{d}-v2" for a in _LOCO for d in ("random", "medium", "medium-replay", "medium-expert", "expert")
    ],
    "kitchen": ["kitchen-complete-v0", "kitchen-partial-v0", "kitchen-mixed-v0"],
    "antmaze": [
        f"antmaze-{m}-v2"
        for m in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
    ],
    "cleandiffuser": [f"{a}-{d}-v2" for a in _LOCO for d in ("medium", "medium-replay", "medium-expert")]
    + ["kitchen-partial-v0", "kitchen-mixed-v0"]
    + [f"antmaze-{m}-v2" for m in ("medium-play", "medium-diverse", "large-play", "large-diverse")],
    "sim": [sim_name(env, SIM_SUITE_POLICY) for env in _LOCO],
    "sim-d4rl": [sim_name(env, kind) for env in _LOCO for kind in AGENT_KINDS],
    # one D4RL-like set per env: what `walker2d-medium-expert-v2` users train on, in three datasets
    "sim-medium-expert": [sim_name(env, "medium-expert") for env in _LOCO],
}
#: `all`: the union of the suites above (not every catalog entry: v0/v1 and maze2d are there by name only)
SUITES["all"] = list(dict.fromkeys(n for s in list(SUITES.values()) for n in s))

#: suffixes that mark a spec as a file path even before the file exists (for the error a missing one gets)
DATA_SUFFIXES = (".hdf5", ".h5", ".parquet")


def d4rl_dir() -> Path:
    """Where D4RL files (and simulated ones) live: $D4RL_DATASET_DIR, else ~/.d4rl/datasets (d4rl's
    default)."""
    return d4rl_dataset_dir()


def file_path(name: str) -> Path:
    """The file a catalog dataset is read from: the URL's file name for D4RL, `<name>.hdf5` for sim-*."""
    entry = CATALOG[name]
    base = entry["url"].rsplit("/", 1)[-1] if entry["url"] else f"{name}.hdf5"
    return d4rl_dir() / base


def entry_for_file(path) -> dict | None:
    """The catalog entry whose file name is `path`'s (D4RL URL basename or `<sim-name>.hdf5`), if any."""
    base = Path(path).name
    for name, entry in CATALOG.items():
        if (entry["url"] or f"{name}.hdf5").rsplit("/", 1)[-1] == base:
            return entry
    return None


def is_path_spec(spec: str) -> bool:
    if not spec.strip() or "://" in spec:  # empty, or a URL: never a local path
        return False
    try:
        Path(spec).expanduser()
        return spec.lower().endswith(DATA_SUFFIXES) or os.sep in spec or Path(spec).exists()
    except (OSError, ValueError, RuntimeError):  # name too long, NUL byte, ~user that does not exist
        return False


def nearest_names(name: str, n: int = 5) -> list[str]:
    """Catalog and suite names closest to a mistyped `name` (for 'did you mean' messages)."""
    pool = list(CATALOG) + list(SUITES)
    return difflib.get_close_matches(name.strip().lower(), pool, n=n, cutoff=0.5)


def unknown(name: str) -> UnknownDatasetError:
    near = nearest_names(name)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    if "://" in name:
        hint += " URLs are not dataset specs: download the file and pass its path (or a catalog name)."
    return UnknownDatasetError(
        f"unknown dataset {name!r}: not a catalog name, suite ({', '.join(SUITES)}), `minari:<id>` or a "
        f"path to an existing .hdf5/.h5/.parquet file.{hint} See `python -m pipeline.datasets list`."
    )


def resolve_datasets(spec) -> list[str]:
    """Expand a comma-separated string (or list) of suites / names / `minari:<id>` / paths into dataset specs.

    Suites expand in order; duplicates are dropped; anything unrecognised raises UnknownDatasetError with
    the nearest names. Paths must exist.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        if item in SUITES:
            out.extend(SUITES[item])
        elif item in CATALOG or item.startswith("minari:") and len(item) > len("minari:"):
            out.append(item)
        elif is_path_spec(item):
            if not Path(item).expanduser().is_file():
                raise DatasetMissingError(f"dataset file {item!r} does not exist")
            out.append(item)
        else:
            raise unknown(item)
    if not out:
        raise UnknownDatasetError(
            f"no dataset names in {spec!r}; give names, suites or paths separated by commas"
        )
    return list(dict.fromkeys(out))
