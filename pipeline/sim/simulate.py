"""Simulated D4RL-layout datasets from real MuJoCo physics (Gymnasium v5 envs), for running offline.

`python -m pipeline.simulate sim-halfcheetah-mixed-v0 [--transitions N] [--seed S] [--out DIR]` writes
DIR/NAME.hdf5 (default DIR: $D4RL_DATASET_DIR) with D4RL's keys plus `infos/qpos`, `infos/qvel`, the
simulator state at each observation, so every transition can be replayed.

Reproducible and parallel: the transitions are cut into fixed chunks, chunk c is rolled out from its own
seed (SeedSequence([seed, c])) in its own fresh env, and chunks are merged in order, so the file depends on
(name, transitions, seed) only, never on the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from invdyn._files import sigterm_raises
from pipeline.data.catalog import (
    CATALOG,
    DEFAULT_SIM_TRANSITIONS,
    SIM_ENVS,
    SIM_POLICIES,
    DatasetError,
    d4rl_dir,
    unknown,
)
from pipeline.sim.rollout import MAX_EPISODE_STEPS, rollout_chunk

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `pipeline` package, for worker processes
#: transitions per independently seeded chunk (the unit of parallel work)
CHUNK = 5000
GENERATOR = "simulated by invdyn"
KEYS = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "qpos", "qvel")


def parse_sim_name(name: str) -> tuple[str, str]:
    """`sim-<env>-<policy>-v0` -> (env, policy)."""
    entry = CATALOG.get(name)
    if entry is not None and entry["simulated"]:
        return entry["sim_env"], entry["policy"]
    if entry is None and not name.startswith("sim-"):
        raise unknown(name)
    what = "is a D4RL dataset (download it)" if entry else "is not a simulated dataset"
    raise DatasetError(
        f"cannot simulate {name!r}: it {what}; simulated names are sim-<env>-<policy>-v0 with env in "
        f"{', '.join(SIM_ENVS)} and policy in {', '.join(SIM_POLICIES)}, e.g. sim-hopper-mixed-v0"
    )


def simulate(
    name: str,
    *,
    transitions: int | None = None,
    seed: int = 0,
    out_dir=None,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Generate `name` (a sim-* catalog name) and write it atomically to OUT_DIR/NAME.hdf5; returns the path."""
    env_name, policy_name = parse_sim_name(name)
    total = default_transitions() if transitions is None else int(transitions)
    if total <= 0:
        raise DatasetError(f"--transitions must be positive, got {total}")
    sizes = [min(CHUNK, total - start) for start in range(0, total, CHUNK)]
    jobs = [(env_name, policy_name, int(seed), c, size) for c, size in enumerate(sizes)]
    parts = _run(jobs, workers, progress, desc=name)
    data = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
    out = Path(out_dir).expanduser() if out_dir is not None else d4rl_dir()
    path = out / f"{name}.hdf5"
    attrs = {
        "name": name,
        "env_id": SIM_ENVS[env_name]["env_id"],
        "env_kwargs": json.dumps(SIM_ENVS[env_name]["env_kwargs"], sort_keys=True),
        "policy": policy_name,
        "seed": int(seed),
        "transitions": total,
        "max_episode_steps": MAX_EPISODE_STEPS,
        "generator": GENERATOR,
    }
    write_hdf5(path, data, attrs)
    return path


def default_transitions() -> int:
    """Size of a sim-* dataset made on demand: $INVDYN_SIM_TRANSITIONS, else DEFAULT_SIM_TRANSITIONS."""
    value = os.environ.get("INVDYN_SIM_TRANSITIONS", "").strip()
    if not value:
        return DEFAULT_SIM_TRANSITIONS
    if not value.isdigit() or int(value) <= 0:
        raise DatasetError(f"INVDYN_SIM_TRANSITIONS must be a positive integer, got {value!r}")
    return int(value)


def _run(jobs, workers: int, progress: bool, desc: str) -> list[dict]:
    """Roll out every job, in this process (workers <= 1) or in `workers` processes; parts in job order."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(j[-1] for j in jobs),
        desc=f"simulate {desc}",
        unit="step",
        unit_scale=True,
        disable=not progress,
    )
    with bar:
        if workers <= 1 or len(jobs) == 1:
            parts = []
            for job in jobs:
                parts.append(rollout_chunk(*job))
                bar.update(job[-1])
            return parts
        with tempfile.TemporaryDirectory(prefix="invdyn-simulate-") as tmp:
            return _run_processes(jobs, min(workers, len(jobs)), Path(tmp), bar)


def _run_processes(jobs, workers: int, job_dir: Path, bar) -> list[dict]:
    """`python -m pipeline.sim.rollout` worker processes (lean: no torch); chunks come back as .npz files."""
    (job_dir / "jobs.json").write_text(json.dumps(jobs))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.sim.rollout", str(job_dir), str(k), str(workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(workers)
    ]
    try:
        done: set[int] = set()
        while len(done) < len(jobs):
            for c, job in enumerate(jobs):
                if c not in done and (job_dir / f"chunk-{c}.npz").exists():
                    done.add(c)
                    bar.update(job[-1])
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                raise DatasetError(f"simulation worker failed:\n{failed[0].communicate()[1][-2000:]}")
            if len(done) < len(jobs):
                time.sleep(0.05)
        for p in procs:
            p.wait()
        parts = []
        for c in range(len(jobs)):
            with np.load(job_dir / f"chunk-{c}.npz") as z:
                parts.append({k: z[k] for k in KEYS})
        return parts
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stderr:
                p.stderr.close()


def write_hdf5(path: Path, data: dict[str, np.ndarray], attrs: dict) -> None:
    """D4RL layout (qpos / qvel under infos/), written to a temp file and renamed: never half-written."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():  # SIGTERM mid-write still removes the temp file
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                for key, value in data.items():
                    f.create_dataset(f"infos/{key}" if key in ("qpos", "qvel") else key, data=value)
                f.attrs.update(attrs)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a dataset is as readable as a downloaded one
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.simulate",
        description="Write a simulated D4RL-layout dataset (real MuJoCo rollouts) to DIR/NAME.hdf5.",
    )
    ap.add_argument("names", nargs="+", metavar="NAME", help="sim-<env>-<policy>-v0, e.g. sim-hopper-gait-v0")
    ap.add_argument(
        "--transitions",
        type=int,
        default=None,
        help=f"default $INVDYN_SIM_TRANSITIONS or {DEFAULT_SIM_TRANSITIONS}",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: $D4RL_DATASET_DIR)")
    ap.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = ap.parse_args(argv)
    try:
        for name in args.names:
            path = simulate(
                name, transitions=args.transitions, seed=args.seed, out_dir=args.out, workers=args.workers
            )
            print(path)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
