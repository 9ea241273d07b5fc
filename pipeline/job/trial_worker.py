"""The training function of a trial's TorchTrainer: train one config, report once.

Its own module so that a Train worker process (executor "train": a fresh process per trial) imports only
torch, Ray Train and the trainer, not the driver's Tune, MLflow and evaluation imports, which cost seconds
per trial on a small machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.job import model_transfer
from pipeline.job.records import PopulationSpec, TrialSpec


@dataclass(frozen=True)
class CrashOnce:
    """Test hook (invdyn.settings.crash_once_dataset): the first attempt of this dataset's first trial
    exits hard, a fault a test cannot cause otherwise; the marker file records that it happened."""

    dataset: str
    marker: str


#: Test hook, JSON {"parties": N, "folder": DIR, "timeout_s": T}: a trial entering its training function
#: waits until N trials are in theirs (or T s passed), and leaves after training. Trials that can run at
#: once then surely overlap, however slowly their processes start; a trial that runs alone is held T s, so
#: any other trial running beside it would overlap it (what a test of one-at-a-time placement looks for).
BARRIER_ENV = "INVDYN_TEST_TRIAL_BARRIER"


@dataclass(frozen=True)
class Barrier:
    """The BARRIER_ENV test hook: a file in `folder` per trial inside its training function."""

    parties: int
    folder: str
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls) -> Barrier | None:
        text = os.environ.get(BARRIER_ENV, "")
        return cls(**json.loads(text)) if text else None

    def enter(self, key: str) -> None:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}-{os.getpid()}").touch()
        deadline = time.time() + self.timeout_s
        while len(list(folder.iterdir())) < self.parties and time.time() < deadline:
            time.sleep(0.05)

    def leave(self, key: str) -> None:
        (Path(self.folder) / f"{key}-{os.getpid()}").unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkerTask:
    """What the training function gets (as `train_loop_config["task"]`: Ray Train wants a dict)."""

    spec: TrialSpec | PopulationSpec
    data: Any  # object-store ref of the dataset's Transitions
    threads: int  # torch threads: the CPUs the trial holds
    device: str  # "cuda" when the trial holds a GPU (fraction), else "cpu"
    trial_entered_at: float  # when the Tune trial started running
    inbox: Any  # the driver's ModelInbox actor (pipeline.job.model_transfer): where the model goes
    crash_once: CrashOnce | None = None
    barrier: Barrier | None = None
    # executor "local": write the model here and return the metrics; None: report them from here
    model_root: str | None = None


def train_worker(loop_config: dict) -> dict | None:
    """The TorchTrainer's training function: train one config (or a population of them), send the model
    dir(s) to the driver's inbox, and report once, with the learning curve(s) and the model's checksum.

    Runs in a Ray Train worker (executor "train") or in the Tune trial's own process (executor "local": a
    TorchTrainer in Train's local mode). With `model_root` set, the model directory is written there and
    the metrics are returned, for the caller to report; else into a temp dir and reported from here. A
    population's model holds a model directory per member, named by the member's trial key. Nothing goes
    to the storage path: on a cluster without a shared file system the driver could not read it there.
    """
    entered = time.time()  # with the driver's trial start and end: where a trial's time outside training goes
    import platform

    import ray
    import torch

    task: WorkerTask = loop_config["task"]
    spec = task.spec
    os.environ["OMP_NUM_THREADS"] = str(task.threads)  # Ray set 1 for a 1-CPU worker; match the CPUs held
    torch.set_num_threads(task.threads)
    _maybe_crash(task.crash_once, spec.dataset)
    if task.barrier is not None:
        task.barrier.enter(spec.key)
    started = time.time()
    transitions = ray.get(task.data)  # zero-copy from the object store, once per node
    device, placed = trial_device(task.device, f"{spec.key} of {spec.dataset}")
    root = task.model_root
    with contextlib.nullcontext(root) if root else tempfile.TemporaryDirectory(prefix="invdyn-trial-") as tmp:
        model = Path(tmp) / "model"
        trained = _train_members if isinstance(spec, PopulationSpec) else _train_one
        metrics = {
            **trained(transitions, spec, task.threads, device, placed, model),
            **placed,
            "device": device,
            "dataset": spec.dataset,
            "sha256": spec.sha256,
            "key": spec.key,
            "worker_wall_s": time.time() - started,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": platform.node(),
            "pid": os.getpid(),  # executor "local": the same process trains trial after trial
            "trial_entered_at": task.trial_entered_at,
            "worker_entered_at": entered,
            "worker_finished_at": time.time(),
        }
        if task.barrier is not None:
            task.barrier.leave(spec.key)
        # Before reporting: a trial counts as finished only once its model is on the driver's node.
        metrics["model_sha256"] = model_transfer.send(model, task.inbox, spec.key)
        if root:  # Train's local mode inside a Tune trial, where Ray refuses `ray.train.report`: return it
            return metrics
        import ray.train

        ray.train.report(metrics)
        return None


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _train_one(transitions, spec: TrialSpec, threads: int, device: str, placed: dict, out: Path) -> dict:
    """Train the trial's config into `out`; its metrics and learning curve."""
    from pipeline.training.config import TrainConfig
    from pipeline.training.trainer import train

    config = TrainConfig.from_dict({**spec.train, "threads": threads, "device": device})
    result = train(transitions, config, out, dataset_name=spec.dataset, resolved_extra=placed)
    return {**_scalars(result.metrics), "curve": result.curve}


def _train_members(transitions, spec: PopulationSpec, threads: int, device: str, placed, out: Path) -> dict:
    """Train the population's members into `out/<member key>/`, one stacked model per shape group; each
    member's metrics and curve under "members" (in the order of `spec.members`)."""
    from pipeline.training.config import TrainConfig
    from pipeline.training.population import shape_groups, train_population

    configs = [TrainConfig.from_dict({**m.train, "threads": threads, "device": device}) for m in spec.members]
    groups = shape_groups(configs)
    group_of = {i: g for g, rows in enumerate(groups) for i in rows}
    results = train_population(
        transitions,
        configs,
        [out / m.key for m in spec.members],
        dataset_name=spec.dataset,
        resolved_extra=placed,
    )
    members = [
        {
            **_scalars(r.metrics),
            "key": m.key,
            "index": i,
            "config": dict(m.train),
            "curve": r.curve,
            "group": group_of[i],
            "group_size": len(groups[group_of[i]]),
        }
        for i, (m, r) in enumerate(zip(spec.members, results, strict=True))
    ]
    return {"members": members, "population": len(members), "groups": len(groups)}


def trial_device(wanted: str, trial: str) -> tuple[str, dict]:
    """(the device this trial trains on, what params.json's training.resolved records about it).

    `wanted` is "cuda" when the trial holds a GPU (fraction). Ray hands out GPUs by id whether or not CUDA
    can use them (a cluster's logical GPUs, `ray start --num-gpus` on a machine without a driver, a CPU
    build of torch): then the trial trains on the CPU, and says so in one line (the job prints it as the
    trial finishes) rather than failing the trial."""
    import ray
    import torch

    gpu_ids = [int(i) if str(i).isdigit() else str(i) for i in ray.get_gpu_ids()]
    placed = {"ray_gpu_ids": gpu_ids, "requested_device": wanted, "gpu_fallback": None}
    if wanted == "cuda" and not torch.cuda.is_available():
        placed["gpu_fallback"] = (
            f"trial {trial}: Ray assigned GPU {gpu_ids} but CUDA is not available in this process "
            "(torch.cuda.is_available() is False); training on the CPU"
        )
        return "cpu", placed
    return wanted, placed


def _maybe_crash(crash_once: CrashOnce | None, dataset: str) -> None:
    if crash_once is None or crash_once.dataset != dataset:
        return
    try:
        fd = os.open(crash_once.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first attempt
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)  # a hard crash of the worker process, as an OOM kill or a segfault would be
