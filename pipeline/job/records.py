"""The records that cross the job's modules: a prepared dataset, a trial to run, a finished trial (a ledger
entry) and a dataset's line of summary.json. Their JSON forms are the files a job leaves."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedDataset:
    """A dataset loaded once on the driver and put in Ray's object store for all of its trials."""

    name: str  # Transitions.name: what its trials, curves and model are called
    spec: str  # as given in --datasets (a catalog name, a path, minari:<id>)
    sha256: str  # of the source: part of every trial key, so changed data trains again
    info: dict  # transitions, episodes, obs_dim, act_dim, source, env_id (copied into its record)
    ref: Any = None  # object-store ref of the Transitions, without simulator state
    physics_reason: str | None = None  # why it cannot be replayed in MuJoCo; None: it can
    state_ref: Any = None  # object-store ref of (qpos, qvel), for the evaluation tasks
    jump: int = 1  # k of its models, a_t = I(s_t, s_{t+k}); k > 1: `name` is `<dataset model name>@k<k>`


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a dataset and a full training config, identified by a key stable across runs."""

    dataset: str
    sha256: str
    key: str  # pipeline.training.search.trial_key: what --resume and the ledger go by
    train: dict  # TrainConfig fields, less device / threads (decided by placement, not searched)

    def tune_config(self) -> dict:
        """The flat config Tune shows and MLflow logs as params: dataset, sha256, key and the train fields."""
        return {"dataset": self.dataset, "sha256": self.sha256, "key": self.key, **self.train}


@dataclass(frozen=True)
class PopulationSpec:
    """One trial that trains a dataset's search points together (`--population`): its members train as
    stacked models, one group per shape (pipeline.training.population), and each is recorded, selected and
    resumed as the trial it stands for (its TrialSpec's key)."""

    dataset: str
    sha256: str
    key: str  # of the population: its members' keys hashed
    members: tuple[TrialSpec, ...]

    def tune_config(self) -> dict:
        return {
            "dataset": self.dataset,
            "sha256": self.sha256,
            "key": self.key,
            "population": len(self.members),
        }


def member_trial_id(trial_id: str, index: int) -> str:
    """The id of a population's member `index` where a trial id stands (ledger, curves, MLflow run tag:
    pipeline.registry.trial_logger names member runs the same way)."""
    return f"{trial_id}-m{index}"


#: the test part's metrics of a model (its params.json metrics, when the split has a test part)
TEST_METRICS = ("test_mse", "test_mse_normalized", "test_r2", "test_baseline_mse")
#: the TrialResult fields taken from the training function's final result
REPORTED = (
    "heldout_mse",
    *TEST_METRICS,
    "baseline_mse",
    "heldout_mse_normalized",
    "epochs",
    "steps",
    "best_epoch",
    "stopped_early",
    "curve",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
    "worker_wall_s",
    "node_ip",
    "node_id",
    "hostname",
    "pid",
    "trial_entered_at",
    "worker_entered_at",
    "worker_finished_at",
    "device",
    "ray_gpu_ids",
    "gpu_fallback",
)


@dataclass
class TrialResult:
    """A finished trial as DIR/trials/<key>.json keeps it (written by the driver as the trial ends)."""

    key: str
    dataset: str
    sha256: str
    config: dict  # the trial's training config (TrialSpec.train)
    trial_id: str | None = None  # Tune's id of the trial
    checkpoint_path: str | None = None  # the model directory in the storage path (local, NFS or s3://)
    status: str = "finished"
    started_at: float | None = None  # driver clock: the trial started ...
    finished_at: float | None = None  # ... and finished
    wall_s: float | None = None  # finished_at - started_at
    # what the training function reported (REPORTED; pipeline.job.trial_worker)
    heldout_mse: float | None = None
    baseline_mse: float | None = None
    heldout_mse_normalized: float | None = None
    test_mse: float | None = None  # the test episodes' metrics (None when the split has no test part)
    test_mse_normalized: float | None = None
    test_r2: float | None = None
    test_baseline_mse: float | None = None
    epochs: int | None = None
    steps: int | None = None
    best_epoch: float | None = None
    stopped_early: bool | None = None
    curve: list | None = None  # the learning curve: one record per evaluation
    train_time_s: float | None = None  # in training steps
    eval_time_s: float | None = None  # in per-epoch validation
    wall_time_s: float | None = None  # of `train`
    worker_wall_s: float | None = None  # of the training function, data fetch included
    node_ip: str | None = None
    node_id: str | None = None
    hostname: str | None = None
    pid: int | None = None
    trial_entered_at: float | None = None  # the Tune trial started running
    worker_entered_at: float | None = None  # the training function started ...
    worker_finished_at: float | None = None  # ... and finished
    device: str | None = None  # what it trained on ("cpu", "cuda")
    ray_gpu_ids: list | None = None  # the GPU ids Ray gave it (ray.get_gpu_ids())
    gpu_fallback: str | None = None  # why it trained on the CPU although Ray gave it a GPU
    # a member of a population trial: {"trial": its key, "members": K, "group": g, "group_size": n}
    population: dict | None = None

    @classmethod
    def from_json(cls, entry: dict) -> TrialResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in names})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DatasetRecord:
    """A dataset's record in DIR/summary.json (the job's contract): its selected model and how it was
    chosen, or why it failed. Fields left None are not written."""

    dataset: str
    spec: str
    status: str | None = None  # "ok" or "failed"
    error: str | None = None  # why it failed
    sha256: str | None = None
    job: str | None = None  # the job's name (MLflow groups its runs by it)
    info: dict = field(default_factory=dict)  # PreparedDataset.info, written as top-level fields
    trials: int | None = None
    trials_finished: int | None = None
    trials_failed: int | None = None
    population: int | None = None  # K: its trials trained as one population of K members
    curves: str | None = None  # DIR/curves/<name>.json
    # how the model was chosen (pipeline.job.selection)
    selected_by: str | None = None
    champion_metric: str | None = None  # the registry's champion rule for this dataset
    candidates: list | None = None  # the trials evaluated, with their metrics
    selection_note: str | None = None
    evaluation: dict | None = None  # headline metrics of the selected model
    evaluation_error: str | None = None
    # the selected trial
    test_mse: float | None = None  # on its test episodes (when the split has a test part)
    test_r2: float | None = None
    test_mse_normalized: float | None = None
    test_baseline_mse: float | None = None
    heldout_mse: float | None = None  # on its validation episodes (what selection ranks by)
    baseline_mse: float | None = None
    config: dict | None = None
    model_dir: str | None = None  # DIR/models/<model name>/
    checkpoint_path: str | None = None
    epochs: int | None = None
    wall_s: float | None = None
    train_time_s: float | None = None
    trial_id: str | None = None
    key: str | None = None
    node_ip: str | None = None
    registration: dict | None = None  # what the registry did with it (pipeline.registry)

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        info = fields.pop("info")
        return {**{k: v for k, v in fields.items() if v is not None}, **info}

    @property
    def ok(self) -> bool:
        return self.status == "ok"
