"""MLflow test helpers: a real `mlflow server` (SQLite backend, artifact proxying, 127.0.0.1, stopped by
pid) and registration records for small real model directories."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`start()` / `stop()` / `restart()` one server process group on a fixed port and store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "server.log"

    def start(self, timeout: float = 240.0) -> MlflowServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's own process group (uvicorn workers included), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # wait until the port is free again so that a restart can bind it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    break
            time.sleep(0.2)

    def restart(self) -> None:
        self.stop()
        self.start()


def model_record(root, dataset: str, seed: int, heldout_mse: float, sha256: str = "a" * 64, **extra) -> dict:
    """A registration record for a small real model directory (random weights, fake metrics: registry logic
    only compares the recorded held-out MSE)."""
    from helpers.models import make_model_dir

    model_dir = make_model_dir(Path(root) / f"{dataset}-{seed}", seed=seed, name=dataset)
    return {
        "dataset": dataset,
        "sha256": sha256,
        "heldout_mse": heldout_mse,
        "baseline_mse": 1.0,
        "config": {"hidden_dim": 16, "dropout": 0.1, "seed": seed},
        "model_dir": str(model_dir),
        "trial_id": f"trial-{dataset}-{seed}",
        **extra,
    }
