"""The training function of a trial's TorchTrainer: train one config, report once.

Its own module so that a Train worker process (executor "train": a fresh process per trial) imports only
torch, Ray Train and the trainer, not the driver's Tune, MLflow and evaluation imports, which cost seconds
per trial on a small machine.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path


def train_worker(loop_config: dict) -> dict | None:
    """The TorchTrainer's training function: train one config and report once, with the learning curve and
    the model dir as checkpoint.

    Runs in a Ray Train worker (executor "train") or in the Tune trial's own process (executor "local": a
    TorchTrainer in Train's local mode). With `model_root` in the loop config, the model directory is written
    there and the metrics are returned, for the caller to report; else into a temp dir reported from here.
    """
    entered = time.time()  # with the driver's trial start and end: where a trial's time outside training goes
    import platform

    import ray
    import torch

    from pipeline.training.trainer import TrainConfig, train

    trial = loop_config["trial"]
    threads = loop_config["threads"]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # Ray set 1 for a 1-CPU worker; match the CPUs we hold
    torch.set_num_threads(threads)
    _maybe_crash(loop_config.get("crash_once"), trial["dataset"])
    started = time.time()
    transitions = ray.get(loop_config["data"])  # zero-copy from the object store, once per node
    config = TrainConfig.from_dict(
        {**loop_config["train"], "threads": threads, "device": loop_config["device"]}
    )
    root = loop_config.get("model_root")
    with contextlib.nullcontext(root) if root else tempfile.TemporaryDirectory(prefix="invdyn-trial-") as tmp:
        result = train(transitions, config, Path(tmp) / "model", dataset_name=trial["dataset"])
        metrics = {
            **{
                k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None
            },
            "dataset": trial["dataset"],
            "sha256": trial["sha256"],
            "key": trial["key"],
            "curve": result.curve,
            "worker_wall_s": time.time() - started,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": platform.node(),
            "pid": os.getpid(),  # executor "local": the same process trains trial after trial
            "trial_entered_at": loop_config.get("trial_entered_at"),
            "worker_entered_at": entered,
            "worker_finished_at": time.time(),
        }
        if root:  # Train's local mode inside a Tune trial, where Ray refuses `ray.train.report`: return it
            return metrics
        import ray.train

        metrics["model_dir"] = f"{loop_config['run_path']}/model"  # where the checkpoint below lands
        checkpoint = ray.train.Checkpoint.from_directory(str(result.model_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="model")
        return None


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
