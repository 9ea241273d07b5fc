"""Pretrain an IDM per dataset with Ray: `python -m pipeline.pretrain_all --datasets sim [--search] --out DIR`.

Ray Tune runs one trial per (dataset, search point); each trial is a Ray Train `TorchTrainer` that runs
`pipeline.training.trainer.train` and reports once, at the end, with the whole learning curve and the model directory
as its checkpoint (in `--storage-path`). By default the trainer runs in Train's local mode in the Tune trial's
own process, which holds the trial's CPUs / GPU fraction and is reused from trial to trial; `--executor train`
gives each trial a Train worker process instead (pipeline.job.placement says when and why). The driver
prepares every dataset once and puts it in Ray's object store; it records each finished trial in
DIR/trials/ so that `--resume` skips it; it picks each dataset's model (lowest held-out MSE, or lowest
MuJoCo metric with `--select-by`: pipeline.job.selection), evaluates it into its model card and
writes DIR/summary.json, DIR/summary.md, DIR/models/<dataset>/ and DIR/curves/; MLflow tracks every
trial, registers the best model per dataset and exports the bundle (see `mlflow_callbacks` and
`register_and_export`).

Run locally it starts its own Ray; under `ray job submit` ($RAY_ADDRESS set) it joins the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ray.tune import Callback

from invdyn._files import atomic_dir, storage_errors
from invdyn.errors import InvdynError
from pipeline.job import outputs as job_summary
from pipeline.job import placement, selection
from pipeline.job.outputs import Ledger, safe_name
from pipeline.job.trial_worker import train_worker
from pipeline.quality.evaluate import SELECT_METRICS, attach_evaluation
from pipeline.training import search

#: Test hook: crash the first attempt of this dataset's first trial (a fault a test cannot cause otherwise).
CRASH_ENV = "INVDYN_TEST_CRASH_ONCE"
DEFAULT_OUT = "invdyn-out"
#: How a trial runs its TorchTrainer (pipeline.job.placement's module doc).
EXECUTORS = ("local", "train")
#: What the ledger keeps of a trial's final result (besides key, config, checkpoint path, wall time).
LEDGER_METRICS = (
    "heldout_mse",
    "baseline_mse",
    "heldout_mse_normalized",
    "epochs",
    "steps",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
    "worker_wall_s",
    "node_ip",
    "node_id",
    "hostname",
    "pid",
    "curve",
    "stopped_early",
    "best_epoch",
    "trial_entered_at",
    "worker_entered_at",
    "worker_finished_at",
)


# ------------------------------------------------------------------------------------------ in Ray


def run_trial(config: dict, job: dict | None = None, data: dict | None = None) -> None:
    """The Tune trial: builds the trial's TorchTrainer and runs it (see `pipeline.job.placement` for the two
    executors: "local" trains in this process, "train" in a Train worker of its own)."""
    entered = time.time()
    pl = job["placement"]
    run_name = f"train-{config['key']}-{uuid.uuid4().hex[:6]}"
    train_keys = set(job["train_fields"])
    loop_config = {
        "trial": {k: config[k] for k in ("dataset", "sha256", "key")},
        "train": {k: v for k, v in config.items() if k in train_keys},
        "data": data[config["dataset"]],
        "threads": pl["threads"],
        "device": "cuda" if pl["gpus"] > 0 else "cpu",
        "crash_once": job.get("crash_once"),
        "run_path": f"{job['storage_path'].rstrip('/')}/{run_name}",
        "trial_entered_at": entered,
    }
    import ray.train
    from ray.train.torch import TorchTrainer

    if job["executor"] == "local":
        # Ray Train's local mode: the training function runs here, in the Tune trial's process, which holds
        # the trial's resources and which Tune reuses for the next trial. It returns its metrics (Ray refuses
        # `ray.train.report` inside a Tune trial); the model is reported to Tune, which persists it to the
        # storage path before the temp dir goes.
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="invdyn-trial-") as tmp:
            result = TorchTrainer(
                train_worker,
                train_loop_config={**loop_config, "model_root": tmp},
                scaling_config=ray.train.ScalingConfig(num_workers=0),
                run_config=ray.train.RunConfig(name=run_name),
            ).fit()
            tune.report(result.return_value, checkpoint=tune.Checkpoint.from_directory(f"{tmp}/model"))
        return
    for k, v in placement.TRAIN_ENV.items():
        os.environ.setdefault(k, v)  # read by TorchTrainer here and propagated to its controller/workers
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            use_gpu=pl["gpus"] > 0,
            resources_per_worker=placement.Placement(**pl).worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=job["storage_path"], callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()


# ------------------------------------------------------------------------------------------ driver


def prepare_datasets(
    specs: list[str], *, download: bool, keep_state: bool = False
) -> tuple[dict, list[dict]]:
    """Load each dataset once on the driver (the Arrow cache makes this cheap) and put it in the object
    store. Returns ({name: {"ref", "sha256", "info", "spec", "physics_reason"[, "state_ref"]}}, [failed
    records]); with `keep_state`, a simulatable dataset's (qpos, qvel) go in as a separate object for
    the evaluation tasks."""
    import ray
    from tqdm.auto import tqdm

    from pipeline.data.sources import load_transitions
    from pipeline.job.selection import physics_reason

    ready, failed = {}, []
    for spec in tqdm(specs, desc="prepare datasets", unit="dataset", disable=len(specs) < 2):
        try:
            t = load_transitions(spec, download=download)
            if len(t) == 0:
                raise InvdynError(f"{spec}: dataset has no transitions")
        except Exception as e:  # noqa: BLE001 - one bad dataset fails alone, with its reason
            failed.append(
                {"dataset": spec, "spec": spec, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            )
            tqdm.write(f"dataset {spec}: FAILED to prepare: {e}")
            continue
        if t.name in ready:
            continue
        info = {
            k: t.stats.get(k) for k in ("transitions", "episodes", "obs_dim", "act_dim", "source", "env_id")
        }
        reason = physics_reason(t)
        state = ray.put((t.qpos, t.qvel)) if keep_state and reason is None else None
        # Training needs no simulator state: qpos / qvel (float64) stay out of the trials' object.
        t = dataclasses.replace(t, qpos=None, qvel=None)
        ready[t.name] = {
            "ref": ray.put(t),
            "sha256": t.sha256,
            "info": info,
            "spec": spec,
            "physics_reason": reason,
        }
        if state is not None:
            ready[t.name]["state_ref"] = state
    return ready, failed


def make_trials(ready: dict, points: list[dict], base: dict) -> list[dict]:
    """One flat Tune config per (dataset, search point): dataset, sha256, key + TrainConfig fields."""
    from pipeline.training.trainer import TrainConfig

    trials = []
    for name, d in ready.items():
        for point in points:
            train = TrainConfig.from_dict({**base, **point})
            train.validate()
            cfg = train.to_dict()
            for k in ("device", "threads"):  # decided by placement, not part of what is searched
                cfg.pop(k)
            trials.append(
                {
                    "dataset": name,
                    "sha256": d["sha256"],
                    "key": search.trial_key(name, d["sha256"], cfg),
                    **cfg,
                }
            )
    # Longest first: Tune starts trials in this order, so the biggest ones no longer run alone at the end.
    return sorted(trials, key=lambda t: -search.estimated_cost(t, ready[t["dataset"]]["info"]))


class LedgerCallback(Callback):
    """Tune callback (driver): writes each finished trial to the ledger the moment it finishes."""

    def __init__(self, ledger: Ledger, total: int = 0):
        self.ledger, self.total = ledger, total
        self.started: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.finished = 0

    def _progress(self, trial, what: str) -> None:
        c = trial.config
        point = ", ".join(f"{k}={c[k]}" for k in ("hidden_dim", "dropout", "arch") if k in c)
        print(
            f"[{self.finished}/{self.total} done, {len(self.errors)} failed] {c['dataset']} ({point}): {what}",
            flush=True,
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = dict(trial.last_result or {})
        cfg = trial.config
        entry = {
            "status": "finished",
            "key": cfg["key"],
            "dataset": cfg["dataset"],
            "sha256": cfg["sha256"],
            "config": {k: v for k, v in cfg.items() if k not in ("dataset", "sha256", "key")},
            "trial_id": trial.trial_id,
            "checkpoint_path": r.get("checkpoint_path")
            or (trial.checkpoint.path if trial.checkpoint else None),
            "started_at": self.started.get(trial.trial_id),
            "wall_s": time.time() - self.started.get(trial.trial_id, time.time()),
            "finished_at": time.time(),
            **{k: r.get(k) for k in LEDGER_METRICS},
        }
        self.ledger.record(cfg["key"], entry)
        self.finished += 1
        self._progress(
            trial,
            f"held-out MSE {r.get('heldout_mse', float('nan')):.4g} after {r.get('epochs')} "
            f"epoch(s), {entry['wall_s']:.0f} s on {r.get('node_ip')}",
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errors[trial.config["key"]] = _error_text(trial)
        self._progress(trial, f"FAILED: {self.errors[trial.config['key']]}")


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1][:500] if lines else f"trial {trial.trial_id} failed"
    except OSError:
        return f"trial {trial.trial_id} failed (error file {path or 'missing'})"


def flat_space(trials: list[dict]) -> dict:
    """A Tune param space with one trial per entry of `trials` and a flat config (the MLflow params):
    a grid over the trial keys, every other field looked up from the key."""
    from ray import tune

    by_key = {t["key"]: t for t in trials}
    fields = sorted({k for t in trials for k in t} - {"key"})
    space = {"key": tune.grid_search(list(by_key))}
    for f in fields:
        space[f] = tune.sample_from(lambda config, f=f: by_key[config["key"]].get(f))
    return space


def run_tune(
    trials: list[dict],
    *,
    job: dict,
    data_refs: dict,
    pl: placement.Placement,
    name: str,
    callbacks: list,
    max_failures: int,
    verbose: int,
) -> dict[str, str]:
    """Run the trials with Ray Tune; returns {trial key: error} for trials that failed for good."""
    from ray import tune

    os.environ.setdefault(
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"
    )  # no CSV/JSON/TensorBoard files per trial
    resources = pl.worker_resources() if job["executor"] == "local" else placement.trial_resources()
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, data=data_refs), resources)
    ledger_cb = LedgerCallback(Ledger(job["out"]), total=len(trials))
    tuner = tune.Tuner(
        trainable,
        param_space=flat_space(trials),
        tune_config=tune.TuneConfig(max_concurrent_trials=pl.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=job["storage_path"],
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[ledger_cb, *callbacks],
            verbose=verbose,
        ),
    )
    tuner.fit()
    return dict(ledger_cb.errors)


def fetch_model(checkpoint_path: str, dest: Path) -> Path:
    """Copy a trial's model directory from the storage path (local, NFS or s3://) to `dest`, atomically."""
    import ray.train

    with atomic_dir(dest) as tmp:
        if Path(checkpoint_path).is_dir():
            shutil.copytree(checkpoint_path, tmp, dirs_exist_ok=True)
        else:
            ray.train.Checkpoint(checkpoint_path).to_directory(str(tmp))
    return dest


def collect(
    out: Path,
    datasets: list[str],
    ready: dict,
    failed: list[dict],
    trials: list[dict],
    errors: dict[str, str],
    job_name: str,
    opts: selection.Options | None = None,
) -> list[dict]:
    """One record per dataset: the selected trial's metrics, evaluation and model dir, or why it failed.

    Without `opts` (or with `opts.evaluate` off) the trial with the best held-out MSE, unevaluated; else
    see pipeline.job.selection: candidates evaluated as Ray tasks, the result written into the model
    directory (card + params.json) before anything registers it.
    """
    opts = opts or selection.Options(evaluate=False)
    done = Ledger(out).done()
    records, chosen = [], {}
    failed_by_spec = {f["spec"]: f for f in failed}
    spec_to_name = {d["spec"]: n for n, d in ready.items()}
    for spec in datasets:
        if spec in failed_by_spec:
            records.append(failed_by_spec[spec])
            continue
        name = spec_to_name.get(spec)
        if name is None or any(r["dataset"] == name for r in records):
            continue
        keys = [t["key"] for t in trials if t["dataset"] == name]
        entries = [done[k] for k in keys if k in done]
        rec = {
            "dataset": name,
            "spec": spec,
            "sha256": ready[name]["sha256"],
            "trials": len(keys),
            "trials_finished": len(entries),
            "job": job_name,
            **ready[name]["info"],
        }
        best = job_summary.best_entry(entries)
        if entries:
            rec["curves"] = str(job_summary.write_curves(out, name, entries))
        records.append(rec)
        if best is None:
            errs = [errors[k] for k in keys if k in errors]
            rec.update(status="failed", error=errs[0] if errs else "no trial finished")
            continue
        rec["trials_failed"] = sum(1 for k in keys if k in errors and k not in done)
        chosen[name] = (rec, selection.candidates(entries, opts, ready[name].get("physics_reason") is None))
    results = {}
    if opts.evaluate:
        results = selection.evaluate_all({n: c for n, (_, c) in chosen.items()}, ready, opts)
    for name, (rec, cands) in chosen.items():
        reason = ready[name].get("physics_reason")
        choice = selection.choose(cands, results, opts, reason)
        best = choice["entry"]
        model_dir = fetch_model(best["checkpoint_path"], out / "models" / safe_name(name))
        result = results.get(best["key"])
        if result and not result.get("error"):
            attach_evaluation(model_dir, result)  # before registration: the registered card shows it
        rec["selected_by"] = choice["selected_by"]
        if opts.evaluate:
            rec.update(selection.record_fields(choice, result, opts))
            ev = rec.get("evaluation") or {}
            print(
                f"{name}: trial {best.get('trial_id')} selected by {choice['selected_by']} of {len(cands)} "
                f"evaluated: held-out MSE {_num(best['heldout_mse'])}, one-step error "
                f"{_num(ev.get('one_step_error'))}, tracking drift {_num(ev.get('tracking_drift'))}"
                + (
                    f"; note: {choice['note']}"
                    if choice.get("note")
                    else f"; note: cannot be simulated ({reason}), non-physics metrics only"
                    if reason
                    else ""
                )
            )
        rec.update(
            status="ok",
            heldout_mse=best["heldout_mse"],
            baseline_mse=best["baseline_mse"],
            config=best["config"],
            model_dir=str(model_dir.resolve()),
            checkpoint_path=best["checkpoint_path"],
            epochs=best["epochs"],
            wall_s=best["wall_s"],
            train_time_s=best["train_time_s"],
            trial_id=best["trial_id"],
            key=best["key"],
            node_ip=best.get("node_ip"),
        )
    return records


def _num(v) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v:.4g}"


# ------------------------------------------------------------------------------- MLflow (issue 6)


def mlflow_callbacks(args, out: Path, job_name: str) -> tuple[str | None, list]:
    """Check the tracking server before any training; the Tune callback that logs a run per trial."""
    if args.no_mlflow:
        return None, []
    from pipeline.registry import store as tracking

    uri = tracking.resolve_uri(args.mlflow_uri, out)
    tracking.check_server(uri)
    return uri, [tracking.tune_callback(uri, args.experiment or job_name, job_name)]


def register_and_export(args, uri: str | None, records: list[dict], callbacks: list) -> bool:
    """After all trials: register each dataset's best model (driver only), then export the bundle.
    Failures leave the models in place (`python -m pipeline.register --from-storage OUT` finishes); returns False."""
    if uri is None:
        return True
    from pipeline.registry import store as tracking

    cb = callbacks[0] if callbacks else None
    if not args.no_register:
        for rec in records:
            if rec.get("status") != "ok":
                continue
            record = dict(rec, experiment=args.experiment or rec.get("job"))
            if cb is not None and cb.run_id(rec["trial_id"]):
                record["mlflow_run_id"] = cb.run_id(rec["trial_id"])
            try:
                rec["registration"] = tracking.register_dataset(uri, record)
            except Exception as e:  # noqa: BLE001 - keep the models; `pipeline.registry.register` finishes later
                rec["registration"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"warning: {rec['dataset']}: not registered: {e}", file=sys.stderr)
    ok = not any("error" in (r.get("registration") or {}) for r in records)
    if args.export:
        from pipeline.registry.export import export_bundle

        try:
            path = export_bundle(
                uri, args.export, datasets=[r["dataset"] for r in records if r.get("status") == "ok"]
            )
            print(f"bundle: {path}")
        except Exception as e:  # noqa: BLE001 - the summary says what was trained; export can be re-run
            print(
                f"error: export to {args.export} failed: {type(e).__name__}: {e}; "
                f"re-run `python -m pipeline.export --out {args.export}`",
                file=sys.stderr,
            )
            ok = False
    return ok


# ---------------------------------------------------------------------------------------------- main


def _redact(uri: str | None) -> str | None:
    if uri is None:
        return None
    from pipeline.registry.store import redact

    return redact(uri)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.pretrain_all", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--datasets", default="sim", help="comma-separated suites, names, minari:<id>, paths (default: sim)"
    )
    ap.add_argument(
        "--search", action="store_true", help="grid hidden_dim {256,512,1024} x dropout {0,0.1,0.2}"
    )
    ap.add_argument(
        "--search-space",
        metavar="JSON",
        help="any grid over TrainConfig fields, e.g. '{\"lr\": [1e-3, 3e-4]}'",
    )
    ap.add_argument("--max-epochs", type=int, help="default: the trainer's (100)")
    ap.add_argument(
        "--patience", type=int, help="early-stopping patience in evaluations (default: the trainer's)"
    )
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus-per-trial", type=float, help="CPUs of a trial (default 1)")
    ap.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPU (fraction) per trial (default: 1/4 when the cluster has GPUs)",
    )
    ap.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: as many as the cluster fits)"
    )
    ap.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local (default): each trial's TorchTrainer runs in Train's local mode in the Tune trial's "
        "process, reused from trial to trial; train: a Train worker process per trial (~10 CPU-s "
        "of process start-up per trial; see pipeline.job.placement)",
    )
    ap.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial (default 2)")
    ap.add_argument(
        "--storage-path", help="checkpoints and Tune state: a local dir, NFS or s3:// (default: DIR/ray)"
    )
    ap.add_argument("--resume", action="store_true", help="skip trials DIR/trials/ records as finished")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    ap.add_argument("--download", action="store_true", help="download missing D4RL files")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this starts (default: all)")
    ap.add_argument("--mlflow-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///DIR/mlflow.db")
    ap.add_argument("--experiment", help="MLflow experiment (default: the job name)")
    ap.add_argument("--no-register", action="store_true", help="track trials but register nothing")
    ap.add_argument("--no-mlflow", action="store_true", help="no MLflow at all")
    ap.add_argument("--export", metavar="PATH", help="write the registered champions as a bundle zip")
    ap.add_argument(
        "--report",
        metavar="DIR",
        help="then write the quality report (python -m pipeline.report --with-recipe) "
        "of the chosen models to DIR",
    )
    ap.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune verbosity (1: live table)"
    )
    ev = ap.add_argument_group("evaluation and selection (pipeline.job.selection)")
    ev.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the selected model on its held-out episodes (MuJoCo metrics where the dataset "
        "can be simulated) into its model card and registry tags (default: on)",
    )
    ev.add_argument(
        "--select-by",
        choices=SELECT_METRICS,
        default="heldout_mse",
        help="metric that picks each dataset's model among its trials, and the registry's champion "
        "rule (default heldout_mse)",
    )
    ev.add_argument(
        "--select-top",
        type=int,
        default=selection.DEFAULT_TOP,
        metavar="K",
        help=f"with a physics --select-by: evaluate the best K trials by held-out MSE (default "
        f"{selection.DEFAULT_TOP}; 0: all)",
    )
    ev.add_argument("--eval-horizon", type=int, default=32, help="tracking horizon (default 32)")
    ev.add_argument(
        "--eval-starts", type=int, default=128, help="tracking start points per model (default 128)"
    )
    ev.add_argument(
        "--eval-samples", type=int, default=2000, help="one-step transitions per model (default 2000)"
    )
    args = ap.parse_args(argv)
    if args.select_by != "heldout_mse" and not args.evaluate:
        ap.error(f"--select-by {args.select_by} needs the evaluation: drop --no-evaluate")
    if args.select_top < 0 or min(args.eval_horizon, args.eval_starts, args.eval_samples) < 1:
        ap.error("--select-top must be >= 0 and --eval-horizon, --eval-starts, --eval-samples >= 1")
    return args


def selection_options(args, pl: placement.Placement) -> selection.Options:
    """The evaluation / selection asked for; each evaluation task holds a trial's CPUs."""
    return selection.Options(
        evaluate=args.evaluate,
        select_by=args.select_by,
        top=args.select_top,
        horizon=args.eval_horizon,
        starts=args.eval_starts,
        samples=args.eval_samples,
        seed=args.seed,
        num_cpus=pl.cpus,
    )


def check_writable(path: Path) -> None:
    """Fail before any training (StorageError naming `path`) when the output / storage folder is read-only
    or full: otherwise every trial would train and then fail to save its checkpoint."""
    with storage_errors(path):
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)


def _job_state(out: Path, resume: bool) -> dict:
    """The job's name (stable across --resume) and its previous state."""
    path = out / job_summary.JOB_JSON
    if resume and path.is_file():
        state = json.loads(path.read_text())
        state["runs"] = state.get("runs", 0) + 1
        return state
    if not resume:
        cleared = Ledger(out).clear()
        if cleared:
            print(
                f"starting over: {cleared} finished trial(s) of an earlier job in {out} ignored (use --resume)"
            )
    return {"job": f"invdyn-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}", "runs": 1}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    out = Path(args.out).expanduser().resolve()
    try:
        check_writable(out)
        if args.storage_path and "://" not in args.storage_path:
            check_writable(Path(args.storage_path).expanduser().resolve())
        return _run(args, out, started)
    except (InvdynError, placement.PlacementError, *_tracking_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _tracking_errors() -> tuple:
    """MLflow errors, when the MLflow module was loaded (it is imported only if tracking is on)."""
    tracking = sys.modules.get("pipeline.registry.store")
    return (tracking.TrackingError,) if tracking else ()


def _run(args, out: Path, started: float) -> int:
    from pipeline.data.catalog import resolve_datasets
    from pipeline.training.trainer import TrainConfig

    specs = resolve_datasets(args.datasets)
    space = search.parse_space(args.search_space, search=args.search)
    points = search.grid_points(space)
    base = {
        k: v
        for k, v in (
            ("max_epochs", args.max_epochs),
            ("patience", args.patience),
            ("batch_size", args.batch_size),
            ("seed", args.seed),
        )
        if v is not None
    }
    state = _job_state(out, args.resume)
    job_name = state["job"]
    # Written now so that a resumed job keeps its name (MLflow groups its runs by it) even after a kill.
    job_summary.write_json_atomic(
        out / job_summary.JOB_JSON, {**state, "datasets": specs, "started": started}
    )
    uri, callbacks = mlflow_callbacks(args, out, job_name)  # fails fast, before any training

    started_ray = placement.connect(num_cpus=args.num_cpus, log_to_driver=args.verbose >= 2)
    try:
        ready, failed = prepare_datasets(specs, download=args.download, keep_state=args.evaluate)
        trials = make_trials(ready, points, base)
        done = Ledger(out).done() if args.resume else {}
        todo = [t for t in trials if t["key"] not in done]
        pl = placement.decide(
            len(todo),
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            max_concurrent=args.max_concurrent,
            start_ahead=args.executor == "train",
        )
        storage = args.storage_path or str(out / "ray")
        if "://" not in storage:
            storage = str(Path(storage).expanduser().resolve())
            if pl.nodes > 1:
                print(
                    f"note: {pl.nodes} nodes share storage path {storage}: it must be on a shared file system"
                )
        print(
            f"job {job_name}: {len(ready)} dataset(s) x {len(points)} config(s) = {len(trials)} trial(s); "
            f"{len(trials) - len(todo)} already finished, {len(todo)} to run. {pl.describe()}"
        )
        crash = os.environ.get(CRASH_ENV)
        job = {
            "executor": args.executor,
            "out": str(out),
            "storage_path": storage,
            "placement": pl.to_dict(),
            "train_fields": sorted(f for f in TrainConfig().to_dict()),
            "search_keys": sorted(space),
            "crash_once": {"dataset": crash, "marker": str(out / f".crash-once-{safe_name(crash)}")}
            if crash
            else None,
        }
        errors = {}
        tune_started = time.time()
        if todo:
            errors = run_tune(
                todo,
                job=job,
                data_refs={n: d["ref"] for n, d in ready.items()},
                pl=pl,
                name=f"{job_name}-run{state['runs']}",
                callbacks=callbacks,
                max_failures=args.max_failures,
                verbose=args.verbose,
            )
        tune_wall = time.time() - tune_started
        opts = selection_options(args, pl)
        records = collect(out, specs, ready, failed, trials, errors, job_name, opts)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    job_summary.write_summary(out, records)  # the models are safe before MLflow is touched again
    ran = [e for e in Ledger(out).done().values() if e["key"] in {t["key"] for t in todo}]
    train_s = sum(e.get("train_time_s") or 0 for e in ran)
    eval_s = sum(e.get("eval_time_s") or 0 for e in ran)
    slot_s = tune_wall * pl.training_slots if ran and tune_wall else None
    job_summary.write_json_atomic(
        out / job_summary.JOB_JSON,
        {
            **state,
            "datasets": specs,
            "storage_path": storage,
            "placement": pl.to_dict(),
            "search_space": space,
            "mlflow_uri": _redact(uri),
            "executor": args.executor,
            "selection": dataclasses.asdict(opts),
            "last_run": {
                "trials": len(trials),
                "skipped": len(trials) - len(todo),
                "ran": len(ran),
                "failed": len(errors),
                "wall_s": time.time() - started,
                "tune_wall_s": tune_wall,
                "train_time_s": train_s,
                "eval_time_s": eval_s,
                "training_slots": pl.training_slots,
                # not in training steps / not in the training loop (steps + per-epoch validation)
                "overhead_share": 1 - train_s / slot_s if slot_s else None,
                "orchestration_share": 1 - (train_s + eval_s) / slot_s if slot_s else None,
            },
        },
    )
    exported = register_and_export(args, uri, records, callbacks)
    table = job_summary.write_summary(out, records)
    print(f"\n{table}\n\nsummary: {out / job_summary.SUMMARY_JSON}  ({time.time() - started:.0f} s)")
    reported = True
    if args.report and any(r.get("status") == "ok" for r in records):
        from pipeline.quality import report

        print("\nreport: training CleanDiffuser's recipe on each dataset's training episodes for comparison")
        reported = (
            report.main(
                ["--summary", str(out / job_summary.SUMMARY_JSON), "--out", args.report, "--with-recipe"]
            )
            == 0
        )
    return 0 if exported and reported and all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
