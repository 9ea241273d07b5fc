"""Simulated D4RL-layout datasets from real MuJoCo physics (`python -m pipeline.simulate NAME...`): chunks
rolled out in worker processes, merged in order, written atomically as NAME.hdf5 with the simulator state."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from invdyn._files import check_writable, file_lock, sigterm_raises
from invdyn.errors import InvdynError
from invdyn.settings import sim_transitions
from pipeline.data.catalog import (
    AGENT_KINDS,
    CATALOG,
    DEFAULT_SIM_TRANSITIONS,
    SIM_ENVS,
    SIM_POLICIES,
    DatasetError,
    d4rl_dir,
    unknown,
)
from pipeline.sim.rollout import MAX_EPISODE_STEPS, rollout_chunk

#: Transitions per independently seeded chunk, the unit of parallel work: chunk c is rolled out from
#: SeedSequence([seed, c]) in a fresh env, so a file depends on (name, transitions, seed), not on the workers.
CHUNK = 5000
#: Default worker count: 2 processes from this many transitions up, else this process alone. A pool takes
#: seconds to start (each worker imports the rollout code and re-imports the parent's main module), which
#: only a large dataset wins back.
POOL_MIN_TRANSITIONS = 200_000
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
        f"{', '.join(SIM_ENVS)} and policy in {', '.join(SIM_POLICIES)}, e.g. sim-hopper-mixed-v0, or "
        f"sim-<env>-<kind>-v0 with kind in {', '.join(AGENT_KINDS)} (trained agents): sim-hopper-medium-v0"
    )


def run_chunk(
    env_name: str, policy: str, seed: int, chunk: int, total: int, size: int
) -> dict[str, np.ndarray]:
    """One chunk of any sim-* kind: an open-loop behaviour policy, a trained agent (medium / expert) or the
    replay of the agent's recorded training rollouts (medium-replay of `total` transitions; chunk c is
    its transitions c * CHUNK...)."""
    if policy in ("medium", "expert"):
        from pipeline.sim.agent_rollout import agent_chunk

        return agent_chunk(env_name, policy, seed, chunk, size)
    if policy == "medium-replay":
        from pipeline.sim.agent_rollout import replay_chunk

        return replay_chunk(env_name, seed, chunk, chunk * CHUNK, size, total=total)
    return rollout_chunk(env_name, policy, seed, chunk, size)


def plan_chunks(env_name: str, policy: str, seed: int, total: int) -> tuple[list[tuple], dict]:
    """The chunk jobs of a dataset and its extra attributes. medium-expert is the medium set of
    ceil(total / 2) transitions followed by the expert set of the rest (each as its own file would be);
    medium-replay holds at most the recorded transitions."""

    def jobs(kind: str, n: int) -> list[tuple]:
        sizes = [min(CHUNK, n - start) for start in range(0, n, CHUNK)]
        return [(env_name, kind, int(seed), c, n, size) for c, size in enumerate(sizes)]

    if policy not in AGENT_KINDS:
        return jobs(policy, total), {}
    from pipeline.sim.agent_policy import agent_path, read_meta
    from pipeline.sim.agent_rollout import REPLAY_SELECTION, replay_size

    if policy == "medium-replay":
        total = min(total, replay_size(env_name))
    parts = {"medium-expert": [("medium", (total + 1) // 2), ("expert", total // 2)]}.get(
        policy, [(policy, total)]
    )
    meta = {kind: read_meta(agent_path(env_name, kind.split("-")[0])) for kind, _ in parts}
    agents = {
        kind: f"{m['algorithm']} {m['env_id']} {m['checkpoint']} at {m['steps']} steps"
        for kind, m in meta.items()
    }
    extra = {"agents": json.dumps(agents, sort_keys=True)}
    if policy == "medium-replay":
        extra["replay_selection"] = REPLAY_SELECTION
    return [j for kind, n in parts for j in jobs(kind, n)], extra


def simulate(
    name: str,
    *,
    transitions: int | None = None,
    seed: int = 0,
    out_dir=None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate `name` (a sim-* catalog name) and write it atomically to OUT_DIR/NAME.hdf5 (default
    $D4RL_DATASET_DIR) with D4RL's keys plus `infos/qpos`, `infos/qvel`; returns the path. `workers`:
    processes rolling out chunks (default: see POOL_MIN_TRANSITIONS); the file does not depend on it."""
    env_name, policy_name = parse_sim_name(name)
    total = default_transitions() if transitions is None else int(transitions)
    if total <= 0:
        raise DatasetError(f"--transitions must be positive, got {total}")
    jobs, extra = plan_chunks(env_name, policy_name, seed, total)
    total = sum(job[-1] for job in jobs)
    if workers is None:
        workers = 2 if total >= POOL_MIN_TRANSITIONS else 1
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
        **extra,
    }
    write_hdf5(path, data, attrs)
    return path


def check_agents_current(name: str, path: Path) -> None:
    """Refuse a generated agent set (sim-<env>-medium-v0, ...) whose actors are not the committed ones any
    more: after an update of pipeline/sim/agent_weights its data no longer is what its name stands for."""
    _, policy = parse_sim_name(name)
    if policy not in AGENT_KINDS:
        return
    import h5py

    with h5py.File(path, "r") as f:
        made_by, selection = f.attrs.get("agents"), f.attrs.get("replay_selection")
        size = int(f.attrs.get("transitions", 0)) or None
    if made_by is None:  # not written by pipeline.simulate: nothing to compare
        return
    current = plan_chunks(*parse_sim_name(name), 0, 2)[1]
    again = f"python -m pipeline.simulate {name} --out {path.parent}" + (
        f" --transitions {size}" if size else ""
    )
    if json.loads(made_by) != json.loads(current["agents"]):
        raise DatasetError(
            f"{path} ({name}) was generated from other agents than the committed ones ({made_by} vs "
            f"{current['agents']}); delete it to have it generated again, or run `{again}`"
        )
    if current.get("replay_selection") != selection:
        raise DatasetError(
            f"{path} ({name}) holds the first transitions of the agent's record, mostly its random "
            f"warm-up; medium-replay is now {current['replay_selection']}, as D4RL's whole replay buffer: "
            f"delete it to have it generated again, or run `{again}`"
        )


def default_transitions() -> int:
    """Size of a sim-* dataset made on demand: $INVDYN_SIM_TRANSITIONS, else DEFAULT_SIM_TRANSITIONS."""
    value = sim_transitions()
    if not value:
        return DEFAULT_SIM_TRANSITIONS
    if not value.isdigit() or int(value) <= 0:
        raise DatasetError(f"INVDYN_SIM_TRANSITIONS must be a positive integer, got {value!r}")
    return int(value)


def make_missing(name: str, path: Path) -> None:
    """Generate the missing catalog file of `name` at `path` (the "simulated" source kind's `make`); a lock
    makes concurrent callers (Ray workers, parallel jobs) wait for one run instead of simulating twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.lock")):
        if not path.is_file():
            simulate(name, out_dir=path.parent)


def _run(jobs, workers: int, progress: bool, desc: str) -> list[dict]:
    """Roll out every job, in this process (workers <= 1) or in `workers` processes; parts in job order."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(j[-1] for j in jobs),
        desc=f"simulate {desc}",
        unit="step",
        unit_scale=True,
        disable=None if progress else True,  # None: a bar on a terminal only, no frames in a log file
    )
    with bar:
        # a daemonic process (a multiprocessing.Pool worker) may not start processes of its own
        if workers <= 1 or len(jobs) == 1 or multiprocessing.current_process().daemon:
            parts = []
            for job in jobs:
                parts.append(run_chunk(*job))
                bar.update(job[-1])
            return parts
        return _run_pool(jobs, min(workers, len(jobs)), bar)


def _pool_context():
    """forkserver where there is one, else spawn: a forked copy of a process that holds MuJoCo / torch /
    Ray threads can deadlock. The forkserver imports the rollout code once and workers are forked from it
    (each also re-imports the parent's main module: multiprocessing's rule)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.sim.rollout", "pipeline.sim.agent_rollout"])
    return ctx


def _run_pool(jobs, workers: int, bar) -> list[dict]:
    """Chunks in a process pool. SIGTERM raises here like Ctrl-C does, so either way the pool is shut down
    (queued chunks cancelled) before the exception leaves, and nothing has been written yet."""
    parts: list[dict | None] = [None] * len(jobs)
    with sigterm_raises(), ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        try:
            pending = {pool.submit(run_chunk, *job): c for c, job in enumerate(jobs)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    c = pending.pop(future)
                    parts[c] = _chunk_result(future, jobs[c])
                    bar.update(jobs[c][-1])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return parts


def _chunk_result(future, job) -> dict:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - any failure in a worker (or its death) ends the run, named
        env_name, policy, seed, chunk, _, size = job
        raise DatasetError(
            f"simulation worker failed on chunk {chunk} ({size} steps of {env_name} under policy {policy}, "
            f"seed {seed}): {type(e).__name__}: {e}"
        ) from e


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


def check_args(args: argparse.Namespace) -> None:
    """Every name, number and the output folder, before the first rollout (not after the first dataset)."""
    for name in args.names:
        parse_sim_name(name)
    if args.transitions is not None and args.transitions <= 0:
        raise DatasetError(f"--transitions must be positive, got {args.transitions}")
    default_transitions()  # a bad $INVDYN_SIM_TRANSITIONS fails here too
    if args.workers is not None and args.workers < 1:
        raise DatasetError(f"--workers must be at least 1, got {args.workers}")
    check_writable(Path(args.out).expanduser() if args.out is not None else d4rl_dir())


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
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"processes (default: 2 from {POOL_MIN_TRANSITIONS:,} transitions up, else 1)",
    )
    args = ap.parse_args(argv)
    try:
        check_args(args)
        for name in args.names:
            path = simulate(
                name, transitions=args.transitions, seed=args.seed, out_dir=args.out, workers=args.workers
            )
            print(path)
    except InvdynError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the dataset being simulated was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
