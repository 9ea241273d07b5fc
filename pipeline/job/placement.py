"""Where trials run and with what: connecting to Ray and choosing the resources of a trial.

Two executors run a trial's TorchTrainer (README "The Ray job" has their measured costs):
- "local" (default): the Tune trial reserves the trial's CPUs / GPU fraction and runs the TorchTrainer in
  Ray Train's local mode (`num_workers=0`: the training function runs in the trial's own process). Tune
  reuses that process from trial to trial, so a trial costs no process start-up at all. The models are
  small: one process per trial trains them well, on a CPU or a GPU fraction. A trial that does not fit
  waits as a pending resource request and costs nothing, so up to AUTOSCALE_CONCURRENCY are started
  however few fit now: a node that joins while the job runs (or that the autoscaler adds for them) takes
  the waiting ones at once.
- "train": the TorchTrainer gets one Train worker holding the CPUs / GPU fraction (process isolation per
  trial; the shape a multi-worker trial would take). Every fit starts five processes (controller, worker,
  synchronization actor, dataset manager, placement-group cleaner), seconds of CPU before the training
  function runs. A Tune trial that also reserved a CPU would deadlock a 2-CPU node once two trials
  start (each holds the trial CPU, waits for a worker CPU; Ray waits forever), so the Tune trial here
  reserves no CPU/GPU, only a little memory (Tune refuses an all-zero bundle). `slots` is how many trials
  fit; `max_concurrent` is a quarter more (at least one), so the next trials start up while the others
  train, and their worker-group start timeout is raised so that waiting is no error.
- Both: Ray sets OMP_NUM_THREADS=1 in a 1-CPU process, and torch follows; the trainer gets `threads` = the
  trial's CPUs, so a 2-CPU trial trains on 2 threads.
- The Train controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a finished run waits
  up to that long to be noticed. TRAIN_ENV lowers it; it is set in the trial process, from where Train
  propagates it to its controller and workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from invdyn import settings
from pipeline.job import console

#: Memory (bytes) a Tune trial process reserves instead of a CPU: it only waits on its TorchTrainer.
TRIAL_MEMORY = 128 * 2**20
#: Env for Ray Train, set in the trial before building a TorchTrainer (see module doc).
TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # One actor less per run; a preempted trial is retried by Tune's FailureConfig anyway.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # A trial started ahead (see `slots`) or waiting for an autoscaled node waits for its CPU, not 60 s.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600",
}
#: Trials started at once (executor "local") when fewer fit: they wait for a node to join or be added.
AUTOSCALE_CONCURRENCY = 16
#: GPU fraction per trial when the cluster has GPUs: the models are small; four share a GPU well.
TRIALS_PER_GPU = 4


@dataclass(frozen=True)
class Placement:
    """Resources of one trial's Train worker, how many trials run at once, and the torch threads."""

    cpus: float  # CPUs of a trial (of its Train worker under executor "train")
    gpus: float  # GPU (fraction) of a trial; 0: it trains on the CPU
    max_concurrent: int  # trials Tune starts at once
    threads: int  # torch threads of a trial: its CPUs
    slots: int  # trials that fit at once (train at once); max_concurrent may start more
    cluster_cpus: float  # what the cluster had when the job decided
    cluster_gpus: float
    nodes: int  # alive nodes then

    @property
    def training_slots(self) -> int:
        """Trials training at once: the slots that fit, or fewer when max_concurrent is lower."""
        return min(self.slots or self.max_concurrent, self.max_concurrent)

    def worker_resources(self) -> dict:
        res = {"CPU": self.cpus}
        if self.gpus > 0:
            res["GPU"] = self.gpus
        return res

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return (
            f"{self.nodes} node(s), {self.cluster_cpus:g} CPU, {self.cluster_gpus:g} GPU; each trial: "
            f"{self.cpus:g} CPU{gpu}, {self.threads} torch thread(s); {self.slots} train at once, "
            f"up to {self.max_concurrent} started"
        )


class PlacementError(ValueError):
    """Resource flags that can never be satisfied."""


def connect(*, address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Join the cluster named by `address` / $RAY_ADDRESS (as under `ray job submit`), else start a local
    Ray with this machine's resources and no dashboard. Returns True when this call started Ray.
    """
    import ray

    if ray.is_initialized():
        return False
    console.quiet_ray_logs()
    address = address or settings.ray_address()
    kwargs = {"logging_level": "WARNING", "log_to_driver": log_to_driver}
    if address:
        ray.init(address=address, **kwargs)
        return True
    # address="local": never attach by surprise to some other Ray already running on this machine.
    # (Ray 2.60 maps 127.0.0.1 to the node's address and binds its gRPC ports on all interfaces; a new
    # local cluster has token authentication on by default, and the dashboard stays off.)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def cluster_totals() -> tuple[float, float, int]:
    """(CPUs, GPUs, alive nodes) of the cluster right now."""
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return float(res.get("CPU", 0)), float(res.get("GPU", 0)), nodes


def decide(
    n_trials: int,
    *,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    totals: tuple[float, float, int] | None = None,
    start_ahead: bool = False,
) -> Placement:
    """Trial resources from the flags, defaulting from what the cluster has (see module doc).
    `start_ahead`: trials reserve no CPU until their Train worker starts (executor "train")."""
    cpus_total, gpus_total, nodes = totals if totals is not None else cluster_totals()
    cpus = 1.0 if cpus_per_trial is None else float(cpus_per_trial)
    if cpus <= 0:
        raise PlacementError(f"--cpus-per-trial must be > 0 (got {cpus:g}): the training loop needs a CPU")
    if gpus_per_trial is None:
        gpus = 1.0 / TRIALS_PER_GPU if gpus_total > 0 else 0.0
    else:
        gpus = float(gpus_per_trial)
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise PlacementError(f"--gpus-per-trial must be a fraction in (0, 1] or a whole number, got {gpus:g}")
    if max_concurrent is not None and max_concurrent < 1:
        raise PlacementError(f"--max-concurrent must be >= 1 (got {max_concurrent})")
    slots = math.floor(cpus_total / cpus + 1e-9)
    if gpus > 0:
        slots = min(slots, math.floor(gpus_total / gpus + 1e-9))
    if max_concurrent is None:
        # Trials beyond the slots wait for a node that joins (an autoscaling cluster adds nodes for them).
        max_concurrent = max(slots, AUTOSCALE_CONCURRENCY)
        if start_ahead and slots > 0:  # each started trial is processes that start up: only a few ahead
            max_concurrent = slots + max(1, slots // 4)
    max_concurrent = max(1, min(max_concurrent, max(n_trials, 1)))
    return Placement(
        cpus=cpus,
        gpus=gpus,
        max_concurrent=max_concurrent,
        threads=max(1, round(cpus)),
        slots=max(slots, 0),
        cluster_cpus=cpus_total,
        cluster_gpus=gpus_total,
        nodes=nodes,
    )


def trial_resources() -> dict:
    """What the Tune trial itself reserves: no CPU (its Train worker holds that), a little memory."""
    return {"CPU": 0, "memory": TRIAL_MEMORY}
