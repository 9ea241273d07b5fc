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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.job.records import TrialSpec


@dataclass(frozen=True)
class CrashOnce:
    """Test hook (invdyn.settings.crash_once_dataset): the first attempt of this dataset's first trial
    exits hard, a fault a test cannot cause otherwise; the marker file records that it happened."""

    dataset: str
    marker: str


@dataclass(frozen=True)
class WorkerTask:
    """What the training function gets (as `train_loop_config["task"]`: Ray Train wants a dict)."""

    spec: TrialSpec
    data: Any  # object-store ref of the dataset's Transitions
    threads: int  # torch threads: the CPUs the trial holds
    device: str  # "cuda" when the trial holds a GPU (fraction), else "cpu"
    run_path: str  # where Train persists this run's checkpoint (executor "train")
    trial_entered_at: float  # when the Tune trial started running
    crash_once: CrashOnce | None = None
    # executor "local": write the model here and return the metrics; None: report them from here
    model_root: str | None = None


def train_worker(loop_config: dict) -> dict | None:
    """The TorchTrainer's training function: train one config and report once, with the learning curve and
    the model dir as checkpoint.

    Runs in a Ray Train worker (executor "train") or in the Tune trial's own process (executor "local": a
    TorchTrainer in Train's local mode). With `model_root` set, the model directory is written there and
    the metrics are returned, for the caller to report; else into a temp dir reported from here.
    """
    entered = time.time()  # with the driver's trial start and end: where a trial's time outside training goes
    import platform

    import ray
    import torch

    from pipeline.training.config import TrainConfig
    from pipeline.training.trainer import train

    task: WorkerTask = loop_config["task"]
    spec = task.spec
    os.environ["OMP_NUM_THREADS"] = str(task.threads)  # Ray set 1 for a 1-CPU worker; match the CPUs held
    torch.set_num_threads(task.threads)
    _maybe_crash(task.crash_once, spec.dataset)
    started = time.time()
    transitions = ray.get(task.data)  # zero-copy from the object store, once per node
    config = TrainConfig.from_dict({**spec.train, "threads": task.threads, "device": task.device})
    root = task.model_root
    with contextlib.nullcontext(root) if root else tempfile.TemporaryDirectory(prefix="invdyn-trial-") as tmp:
        result = train(transitions, config, Path(tmp) / "model", dataset_name=spec.dataset)
        scalars = {
            k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None
        }
        metrics = {
            **scalars,
            "dataset": spec.dataset,
            "sha256": spec.sha256,
            "key": spec.key,
            "curve": result.curve,
            "worker_wall_s": time.time() - started,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": platform.node(),
            "pid": os.getpid(),  # executor "local": the same process trains trial after trial
            "trial_entered_at": task.trial_entered_at,
            "worker_entered_at": entered,
            "worker_finished_at": time.time(),
        }
        if root:  # Train's local mode inside a Tune trial, where Ray refuses `ray.train.report`: return it
            return metrics
        import ray.train

        metrics["model_dir"] = f"{task.run_path}/model"  # where the checkpoint below lands
        checkpoint = ray.train.Checkpoint.from_directory(str(result.model_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="model")
        return None


def _maybe_crash(crash_once: CrashOnce | None, dataset: str) -> None:
    if crash_once is None or crash_once.dataset != dataset:
        return
    try:
        fd = os.open(crash_once.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first attempt
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)  # a hard crash of the worker process, as an OOM kill or a segfault would be
