"""The job (`python -m pipeline.job.pretrain_all`) run in a subprocess with a clean environment, for the job
tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.paths import REPO

CHEETAH, HOPPER = "sim-halfcheetah-random-v0", "sim-hopper-random-v0"


def job_env(root: Path, **extra) -> dict:
    """A clean environment for a job subprocess: its own invdyn home, D4RL dir and HOME under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "INVDYN_TEST"))}
    for var, sub in (("INVDYN_HOME", "invdyn-home"), ("D4RL_DATASET_DIR", "d4rl"), ("HOME", "home")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_job(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.job.pretrain_all", "--verbose", "0", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    return proc
