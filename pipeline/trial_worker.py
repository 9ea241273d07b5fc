"""What runs inside a trial's Ray Train worker (or the Tune trial itself): train one config, report once.

Its own module so that a Train worker process imports only torch, Ray Train and the trainer, not the
driver's Tune, MLflow and evaluation imports: every trial starts a fresh worker process, and those imports
cost seconds per trial on a small machine.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def train_one(loop_config: dict, *, in_train_worker: bool = True) -> None:
    """Train one config and report once, with the learning curve and the model dir as checkpoint.

    Runs in the Ray Train worker (executor "train") or in the Tune trial itself (executor "tune").
    """
    entered = time.time()  # with the driver's trial start and end: where a trial's time outside training goes
    import platform

    import ray
    import torch

    from .trainer import TrainConfig, train

    trial = loop_config["trial"]
    threads = loop_config["threads"]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # Ray set 1 for a 1-CPU worker; match the CPUs we hold
    torch.set_num_threads(threads)
    _maybe_crash(loop_config.get("crash_once"), trial["dataset"])
    started = time.time()
    transitions = ray.get(loop_config["data"])  # zero-copy from the object store, once per node
    config = TrainConfig.from_dict({**loop_config["train"], "threads": threads, "device": loop_config["device"]})
    with tempfile.TemporaryDirectory(prefix="invdyn-trial-") as tmp:
        result = train(transitions, config, Path(tmp) / "model", dataset_name=trial["dataset"])
        metrics = {
            **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
            "dataset": trial["dataset"],
            "sha256": trial["sha256"],
            "key": trial["key"],
            "curve": result.curve,
            "worker_wall_s": time.time() - started,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": platform.node(),
            "trial_entered_at": loop_config.get("trial_entered_at"),
            "worker_entered_at": entered,
            "worker_finished_at": time.time(),
        }
        if in_train_worker:
            import ray.train

            metrics["model_dir"] = f"{loop_config['run_path']}/model"  # where the checkpoint below lands
            checkpoint = ray.train.Checkpoint.from_directory(str(result.model_dir))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="model")
        else:
            from ray import tune

            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(result.model_dir)))


def train_worker(loop_config: dict) -> None:
    """The Ray Train worker's loop (executor "train")."""
    train_one(loop_config, in_train_worker=True)


def _maybe_crash(crash_once: dict | None, dataset: str) -> None:
    if not crash_once or crash_once.get("dataset") != dataset:
        return
    marker = Path(crash_once["marker"])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first attempt gets here
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)  # a hard crash of the worker process, as an OOM kill or a segfault would be
