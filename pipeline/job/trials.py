"""The Tune / Train glue: the trials of a job, the Tune trial that runs a TorchTrainer, the Tune run, the
callback that receives each finished trial's model (pipeline.job.model_transfer) and writes the ledger, and
fetching a trial's model."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from invdyn._files import atomic_dir
from invdyn.settings import jump_model_name
from pipeline.job import console, model_transfer, placement, populations
from pipeline.job.config import JobConfigError
from pipeline.job.outputs import Ledger
from pipeline.job.records import REPORTED, PopulationSpec, PreparedDataset, TrialResult, TrialSpec
from pipeline.job.trial_worker import Barrier, CrashOnce, WorkerTask, train_worker
from pipeline.training import search
from pipeline.training.config import TrainConfig


def parse_jumps(text: str) -> list[int]:
    """`--jumps 1,4` -> [1, 4]: each k trains its own models (k > 1: `<name>@k<k>`)."""
    try:
        jumps = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        jumps = []
    if not jumps or jumps[0] < 1:
        raise JobConfigError(f"--jumps must be comma-separated integers >= 1 (e.g. 1,4), got {text!r}")
    return jumps


def with_jumps(ready: dict[str, PreparedDataset], jumps: list[int]) -> dict[str, PreparedDataset]:
    """The datasets to train, each once per k of `jumps`: a k > 1 entry shares the data (one object in the
    store) under its model's name, and has no physics evaluation (that replays one step)."""
    out = {name: d for name, d in ready.items() if 1 in jumps}
    for name, d in ready.items():
        for k in (k for k in jumps if k > 1):
            reason = f"jump {k}: the one-step and tracking metrics replay one step (k = 1 models only)"
            jumpy = jump_model_name(name, k)
            out[jumpy] = dataclasses.replace(d, name=jumpy, jump=k, physics_reason=reason, state_ref=None)
    return out


def make_trials(ready: dict[str, PreparedDataset], points: list[dict], base: TrainConfig) -> list[TrialSpec]:
    """One trial per (dataset, jump, search point): the base config with the point's fields set."""
    trials = []
    if any("jump" in point for point in points):
        raise JobConfigError("jump cannot be searched (each k is its own model): use --jumps 1,4")
    for name, d in ready.items():
        for point in points:
            fixed = {}
            if "seed" in point and "split_seed" not in point and base.split_seed is None:
                # a searched seed varies initial weights and batches, never the split: every point of a
                # dataset is chosen on the same validation episodes and leaves the same test episodes out
                fixed["split_seed"] = base.seed
            train = TrainConfig.from_dict({**base.to_dict(), **fixed, **point, "jump": d.jump})
            train.validate()
            cfg = train.to_dict()
            for k in ("device", "threads"):  # decided by placement, not part of what is searched
                cfg.pop(k)
            if cfg["jump"] == 1:  # the trial keys of one-step models stay those of jobs before jumps
                cfg.pop("jump")
            trials.append(TrialSpec(name, d.sha256, search.trial_key(name, d.sha256, cfg), cfg))
    # Longest first: Tune starts trials in this order, so the biggest ones no longer run alone at the end.
    return sorted(trials, key=lambda t: -search.estimated_cost(t.train, ready[t.dataset].info))


@dataclass(frozen=True)
class TrialRun:
    """What every Tune trial of one run shares (handed to each trial through the object store)."""

    executor: str  # "local" or "train" (pipeline.job.placement)
    storage_path: str  # Tune's (and Train's) state: a local dir, NFS or s3:// (models travel through Ray)
    placement: placement.Placement
    # by trial key: the Tune config names the key, the spec says the rest (a population: its members)
    specs: dict[str, TrialSpec | PopulationSpec]
    data: dict[str, Any]  # object-store ref of each dataset's Transitions, by name
    crash_once: CrashOnce | None = None
    barrier: Barrier | None = None  # test hook (pipeline.job.trial_worker.BARRIER_ENV)
    inbox: Any = None  # the driver's ModelInbox actor, opened by run_tune


def run_trial(config: dict, run: TrialRun) -> None:
    """The Tune trial: builds the trial's TorchTrainer and runs it (pipeline.job.placement has the two
    executors: "local" trains in this process, "train" in a Train worker of its own)."""
    entered = time.time()
    spec = run.specs[config["key"]]
    pl = run.placement
    run_name = f"train-{spec.key}-{uuid.uuid4().hex[:6]}"
    task = WorkerTask(
        spec=spec,
        data=run.data[spec.dataset],
        threads=pl.threads,
        device="cuda" if pl.gpus > 0 else "cpu",
        trial_entered_at=entered,
        inbox=run.inbox,
        crash_once=run.crash_once,
        barrier=run.barrier,
    )
    import ray.train
    from ray.train.torch import TorchTrainer

    if run.executor == "local":
        # Ray Train's local mode: the training function runs here, in the Tune trial's process, which holds
        # the trial's resources and which Tune reuses for the next trial. It returns its metrics (Ray
        # refuses `ray.train.report` inside a Tune trial) once its model is in the driver's inbox.
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="invdyn-trial-") as tmp:
            result = TorchTrainer(
                train_worker,
                train_loop_config={"task": dataclasses.replace(task, model_root=tmp)},
                scaling_config=ray.train.ScalingConfig(num_workers=0),
                run_config=ray.train.RunConfig(name=run_name),
            ).fit()
        tune.report(result.return_value)
        return
    for k, v in placement.TRAIN_ENV.items():
        os.environ.setdefault(k, v)  # read by TorchTrainer here and propagated to its controller/workers
    from ray.train.torch import TorchConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    TorchTrainer(
        train_worker,
        train_loop_config={"task": task},
        # One worker, no gradients exchanged: gloo always starts, where Train's GPU default (NCCL) fails on
        # a torch without NCCL (a CPU build given a Ray GPU trains on the CPU, trial_worker.trial_device).
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=pl.gpus > 0, resources_per_worker=pl.worker_resources()
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=run.storage_path, callbacks=[TuneReportCallback()]
        ),
    ).fit()


class LedgerCallback(Callback):
    """Tune callback (driver): takes each finished trial's model from the inbox into DIR/trial-models/<key>/,
    writes the trial to the ledger the moment it finishes, and prints its line (pipeline.job.console).

    It must come first among the run's callbacks: it sets the result's `model_dir` to the model's folder on
    this node, where the MLflow trial logger (a later callback) uploads it from."""

    def __init__(
        self,
        ledger: Ledger,
        specs: dict[str, TrialSpec | PopulationSpec],
        *,
        nodes: int = 1,
        inbox=None,
        models: Path | None = None,
    ):
        self.ledger, self.specs = ledger, specs
        self.inbox, self.models = inbox, models
        self.started: dict[str, float] = {}
        self.errors: dict[str, str] = {}  # trial key (a population's: each member's) -> its error's last line
        self.retried: list[dict] = []  # a trial's attempts that failed and that Tune runs again
        self.nodes: dict[str, str | None] = {}  # trial id -> the Ray node of its current attempt
        members = [m for s in specs.values() for m in populations.members_of(s)]
        varying = console.varying_fields([m.train for m in members])
        self.progress = console.TrialProgress(len(members), varying=varying, nodes=nodes)

    def __getstate__(self):  # Tune pickles its callbacks with the run config; a tqdm bar does not pickle
        state = dict(self.__dict__)
        state["progress"] = console.TrialProgress(0, varying=[])
        return state

    def setup(self, **info):
        self.progress.open()

    def on_experiment_end(self, trials, **info):
        self.progress.close()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())
        self.nodes[trial.trial_id] = _actor_node(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = dict(trial.last_result or {})
        spec = self.specs[trial.config["key"]]
        try:
            model_dir = self._receive(spec, r)
        except Exception as e:  # noqa: BLE001 - a model that did not arrive: its trial failed, not the job
            self._failed(spec, f"{type(e).__name__}: {e}")
            return
        if trial.last_result is not None:
            trial.last_result["model_dir"] = str(model_dir)  # for the MLflow trial logger (see class doc)
        now = time.time()
        started = self.started.get(trial.trial_id)
        head = {
            "trial_id": trial.trial_id,
            "checkpoint_path": str(model_dir),
            "started_at": started,
            "finished_at": now,
            "wall_s": now - (started or now),
        }
        if isinstance(spec, PopulationSpec):
            entries = populations.member_entries(spec, r, head)
            populations.record_groups(self.ledger, spec, entries, trial.trial_id)
        else:
            reported = {k: r.get(k) for k in REPORTED}
            entries = [TrialResult(spec.key, spec.dataset, spec.sha256, dict(spec.train), **head, **reported)]
            self.ledger.record(entries[0])
        for e in entries:
            self.progress.finished_line(e.dataset, e.config, e.to_json(), e.wall_s)
        if r.get("gpu_fallback"):  # the trial's own words, once, where the user reads the job's lines
            self.progress.warning_line(r["gpu_fallback"])

    def on_trial_error(self, iteration, trials, trial, **info):
        node = self.nodes.get(trial.trial_id)
        self._failed(
            self.specs[trial.config["key"]], _error_text(trial) + (f" (on node {node})" if node else "")
        )

    def on_trial_recover(self, iteration, trials, trial, **info):
        spec = self.specs[trial.config["key"]]
        error = _error_text(trial)
        node = self.nodes.get(trial.trial_id)  # a lost node: the id of the machine that is gone
        attempt = {
            "key": spec.key,
            "dataset": spec.dataset,
            "trial_id": trial.trial_id,
            "node_id": node,
            "error": error,
        }
        self.retried.append(attempt)
        on = f" on node {node}" if node else ""
        self.progress.warning_line(f"trial {trial.trial_id} of {spec.dataset} failed{on} ({error}): retrying")

    def _receive(self, spec: TrialSpec | PopulationSpec, result: dict) -> Path:
        """The finished trial's model, from the driver's inbox into DIR/trial-models/<key>/ (checked)."""
        if self.inbox is None or self.models is None:
            raise model_transfer.ModelTransferError(f"trial {spec.key}: the job opened no model inbox")
        digest = result.get("model_sha256")
        return model_transfer.receive(self.inbox, spec.key, digest, self.models / spec.key)

    def _failed(self, spec: TrialSpec | PopulationSpec, error: str) -> None:
        for m in populations.members_of(spec):
            self.errors[m.key] = error
            self.progress.failed_line(m.dataset, m.train, error)


def _actor_node(trial) -> str | None:
    """The Ray node id of the process that runs `trial` now (its Tune actor, from the GCS's actor table), so
    that a failed attempt can name the node it was on (a lost node, when the error is its actor's death)."""
    actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
    if actor is None:
        return None
    try:
        from ray._private import state as ray_state

        return (ray_state.actors(actor._actor_id.hex()).get("Address") or {}).get("NodeID") or None
    except Exception:  # noqa: BLE001 - only a name in a message; never fail a trial for it
        return None


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1][:500] if lines else f"trial {trial.trial_id} failed"
    except OSError:
        return f"trial {trial.trial_id} failed (error file {path or 'missing'})"


def flat_space(trials: list[TrialSpec | PopulationSpec]) -> dict:
    """A Tune param space with one trial per spec and a flat config (the MLflow params): a grid over the
    trial keys, every other field looked up from the key."""
    from ray import tune

    by_key = {t.key: t.tune_config() for t in trials}
    fields = sorted({k for c in by_key.values() for k in c} - {"key"})
    space = {"key": tune.grid_search(list(by_key))}
    for f in fields:
        space[f] = tune.sample_from(lambda config, f=f: by_key[config["key"]].get(f))
    return space


@dataclass
class TuneOutcome:
    """What a Tune run ended with, beyond the ledger: trials that failed for good, and retried attempts."""

    errors: dict[str, str]  # trial key -> the last line of its error
    retried: list[dict]  # {key, dataset, trial_id, error} of each attempt Tune ran again


def run_tune(
    run: TrialRun, *, out: Path, name: str, callbacks: list, max_failures: int, verbose: int
) -> TuneOutcome:
    """Run the trials of `run` with Ray Tune, each trial's model sent to an inbox on this driver's node
    (pipeline.job.model_transfer). `verbose` 0 leaves the output to the job's own line per trial
    (pipeline.job.console)."""
    import ray
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # No CSV / TensorBoard files per trial. The JSON logger stays: at the end of a fit Tune reads each
    # trial's result.json back (its ExperimentAnalysis) and warns about every trial that has none.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    pl = run.placement
    inbox = model_transfer.open_inbox()
    run = dataclasses.replace(run, inbox=inbox)
    resources = pl.worker_resources() if run.executor == "local" else placement.trial_resources()
    trainable = tune.with_resources(tune.with_parameters(run_trial, run=run), resources)
    models = out / model_transfer.TRIAL_MODELS
    ledger_cb = LedgerCallback(Ledger(out), run.specs, nodes=pl.nodes, inbox=inbox, models=models)
    tuner = tune.Tuner(
        trainable,
        param_space=flat_space(list(run.specs.values())),
        tune_config=tune.TuneConfig(max_concurrent_trials=pl.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=run.storage_path,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # the ledger's callback first: it receives the model that the later ones read (its doc)
            callbacks=[ledger_cb, JsonLoggerCallback(), *callbacks],
            verbose=console.tune_verbosity(verbose),
        ),
    )
    try:
        tuner.fit()
    finally:
        ledger_cb.progress.close()  # an interrupted fit never calls on_experiment_end
        ray.kill(inbox)
    return TuneOutcome(dict(ledger_cb.errors), list(ledger_cb.retried))


def fetch_model(source, dest: Path) -> Path:
    """Write a trial's model directory to `dest`, atomically, from where the ledger says it is (a folder on
    this node: DIR/trial-models/<key>/; an older job's storage path, NFS or s3://) or from a PackedModel
    (pipeline.job.model_transfer) that came through the object store, checked first."""
    import ray.train

    if isinstance(source, model_transfer.PackedModel):
        return model_transfer.unpack(source, dest)
    with atomic_dir(dest) as tmp:
        if Path(source).is_dir():
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        else:
            ray.train.Checkpoint(source).to_directory(str(tmp))
    return dest
