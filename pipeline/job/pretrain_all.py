"""Pretrain an IDM per dataset with Ray: `python -m pipeline.pretrain_all [--datasets SUITE] [--out DIR]`.

The steps of `run`: prepare each dataset once on the driver and put it in Ray's object store; run one Ray
Tune trial per (dataset, search point), each a Ray Train `TorchTrainer` around the plain-PyTorch
trainer (pipeline.job.trials, pipeline.job.placement), or with `--population` (the default when trials
get a GPU) one trial per dataset that trains all of its search points as stacked models
(pipeline.job.populations); record each finished trial in DIR/trials/ so that `--resume` skips it;
choose and evaluate each dataset's model (pipeline.job.selection); write DIR/summary.json, summary.md,
models/, curves/ (pipeline.job.outputs); register the models and export the bundle (pipeline.registry,
from this driver only); optionally write the quality report. With `--split-seeds 0,1,2` all of that but the
registry runs once per split seed into DIR/split-<s>/, only the first seed's models are registered and
exported, and the report is one over every repeat (pipeline.job.split_repeats).

Run locally it starts its own Ray; under `ray job submit` ($RAY_ADDRESS set) it joins the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from invdyn import _files, settings
from invdyn.errors import InvdynError
from pipeline.dataclass_cli import add_options, from_namespace
from pipeline.job import outputs, placement, populations, selection, split_repeats
from pipeline.job.config import TRAIN_FLAGS, JobConfig, JobConfigError
from pipeline.job.outputs import Ledger
from pipeline.job.records import DatasetRecord, PreparedDataset
from pipeline.job.trial_worker import Barrier, CrashOnce
from pipeline.job.trials import TrialRun, make_trials, parse_jumps, run_tune, with_jumps
from pipeline.quality.evaluate import EvalConfig
from pipeline.training import search
from pipeline.training.config import TrainConfig

#: the flags of the "evaluation and selection" group (their help names pipeline.job.selection)
SELECTION_FLAGS = ("evaluate", "select_by", "select_top", "ensemble")


def parse_args(argv=None) -> JobConfig:
    ap = argparse.ArgumentParser(prog="python -m pipeline.pretrain_all", description=__doc__.split("\n\n")[0])
    add_options(ap, JobConfig, skip=(*SELECTION_FLAGS, "verbose"))
    add_verbosity(ap)
    add_options(ap, TrainConfig, only=TRAIN_FLAGS, group="training (every trial; --search-space varies them)")
    ev = ap.add_argument_group("evaluation and selection (pipeline.job.selection)")
    add_options(ev, JobConfig, only=SELECTION_FLAGS)
    add_options(ev, EvalConfig, prefix="eval-")
    args = ap.parse_args(argv)
    args.verbose = min(args.verbose, 2)  # -vvv is -vv
    job = from_namespace(
        JobConfig,
        args,
        train=from_namespace(TrainConfig, args),
        evaluation=from_namespace(EvalConfig, args, prefix="eval-", seed=args.seed),
    )
    try:
        job.validate()
        parse_jumps(job.jumps)
    except JobConfigError as e:
        ap.error(str(e))
    return job


def add_verbosity(ap: argparse.ArgumentParser) -> None:
    """`-v` / `-vv` counted, and `--verbose N` too; both set JobConfig.verbose (the field's help)."""
    field = next(f for f in dataclasses.fields(JobConfig) if f.name == "verbose")
    choices = field.metadata["choices"]
    ap.add_argument("-v", dest="verbose", action="count", default=field.default, help=field.metadata["help"])
    ap.add_argument("--verbose", dest="verbose", type=int, choices=choices, help="the same as a number")


def main(argv=None) -> int:
    job = parse_args(argv)
    started = time.time()
    out = Path(job.out).expanduser().resolve()
    try:
        _files.check_writable(out)  # before any training: every trial saves there
        if job.storage_path and "://" not in job.storage_path:
            _files.check_writable(Path(job.storage_path).expanduser().resolve())
        return run(job, out, started)
    except (InvdynError, JobConfigError, placement.PlacementError, *_tracking_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(job: JobConfig, out: Path, started: float) -> int:
    """The job, step by step; returns the exit code (1 when a dataset failed or MLflow did not finish)."""
    from pipeline.data.catalog import resolve_datasets
    from pipeline.data.sources import check_available

    specs = resolve_datasets(job.datasets)
    check_available(specs, download=job.download)  # before Ray starts: every dataset is there or made
    space = search.parse_space(job.search_space, search=job.search)
    points = search.grid_points(space)
    repeats = split_repeats.plan(out, job.seeds(), space)
    state = outputs.job_state(out, job.resume)
    split_repeats.start_over(repeats, job.resume)
    # Written now so that a resumed job keeps its name (MLflow groups its runs by it) even after a kill.
    outputs.write_job(
        out, {**state, "datasets": specs, "started": started, **split_repeats.describe(repeats)}
    )
    uri, logger = start_tracking(job, out, state["job"])  # fails fast, before any training
    started_ray = placement.connect(num_cpus=job.num_cpus, log_to_driver=job.verbose >= 2)
    try:
        ready, failed = prepare_datasets(specs, download=job.download, keep_state=job.evaluate)
        ready = with_jumps(ready, parse_jumps(job.jumps))
        stage = split_repeats.Stage(state, specs, ready, failed, points, space, uri, logger)
        for rep in repeats:  # one without --split-seeds: DIR itself
            run_repeat(job, rep, stage, started if rep.split_seed is None else time.time())
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    first = repeats[0]
    over_splits = None
    if first.split_seed is not None:
        over_splits = split_repeats.finish(out, state, specs, repeats)
        tracked = uri is not None
        note = split_repeats.registered_note(repeats, tracked and job.register, tracked and bool(job.export))
        print(f"\n{note}")
    exported = register_and_export(job, uri, logger, first.records)
    table = outputs.write_summary(first.out, first.records)
    heading = "" if first.split_seed is None else f"split seed {first.split_seed} (registered):\n"
    print(
        f"\n{heading}{table}\n\nsummary: {first.out / outputs.SUMMARY_JSON}  ({time.time() - started:.0f} s)"
    )
    if over_splits:
        print(f"\n{over_splits}\n\nover split seeds: {out / split_repeats.SPLITS_MD}")
    reported = write_report(job, repeats)
    everything_ok = all(r.ok for rep in repeats for r in rep.records)
    return 0 if exported and reported and everything_ok else 1


def run_repeat(job: JobConfig, rep: split_repeats.Repeat, stage: split_repeats.Stage, started: float) -> None:
    """The trial grid on one split: its trials into rep.out's ledger, then each dataset's model chosen and
    rep.out's summary.json and job.json written (rep.records, rep.record)."""
    out, state = rep.out, stage.state
    trials = make_trials(stage.ready, stage.points, rep.train_config(job.train))
    done = Ledger(out).done() if job.resume else {}
    todo = [t for t in trials if t.key not in done]
    pl, tune_specs, population = plan_trials(job, todo, stage.ready)
    storage = storage_path(job, out, pl)
    print(
        f"{rep.label}job {state['job']}: {len(stage.ready)} dataset(s) x {len(stage.points)} config(s) = "
        f"{len(trials)} trial(s); {len(trials) - len(todo)} already finished, {len(todo)} to run"
        f"{f' as {len(tune_specs)} population trial(s)' if population else ''}. {pl.describe()}"
    )
    trial_run = TrialRun(
        executor=job.executor,
        storage_path=storage,
        placement=pl,
        specs={t.key: t for t in tune_specs},
        data={n: d.ref for n, d in stage.ready.items()},
        crash_once=crash_once(out),
        barrier=Barrier.from_env(),
    )
    tune_started = time.time()
    errors, retried = {}, []
    if todo:
        outcome = run_tune(
            trial_run,
            out=out,
            name=f"{state['job']}-run{state['runs']}{rep.tune_suffix}",
            callbacks=[stage.logger] if stage.logger else [],
            max_failures=job.max_failures,
            verbose=job.verbose,
        )
        errors, retried = outcome.errors, outcome.retried
    tune_wall = time.time() - tune_started
    opts = selection_options(job, pl)
    rep.records = select_models(
        job, out, stage.specs, stage.ready, stage.failed, trials, errors, state["job"], opts
    )
    note_retries(rep.records, retried)
    outputs.write_summary(out, rep.records)  # the models are safe before MLflow is touched again
    timing = {**last_run(out, trials, todo, errors, started, tune_wall, pl), "retried": retried}
    record = job_record(job, state, stage.specs, storage, pl, stage.space, stage.uri, opts, timing)
    rep.record = {**record, "population": population}
    if rep.split_seed is not None:
        rep.record["split_seed"] = rep.split_seed
    outputs.write_job(out, rep.record)


# ------------------------------------------------------------------------------------------ the steps


def prepare_datasets(
    specs: list[str], *, download: bool, keep_state: bool = False
) -> tuple[dict[str, PreparedDataset], list[DatasetRecord]]:
    """Load each dataset once on the driver (the Arrow cache makes this cheap) and put it in the object
    store. Returns ({name: prepared dataset}, [records of the datasets that failed]); with `keep_state`, a
    simulatable dataset's (qpos, qvel) go in as a separate object for the evaluation tasks."""
    import ray
    from tqdm.auto import tqdm

    from pipeline.data.sources import load_transitions

    ready, failed = {}, []
    # a bar only on a terminal (tqdm's disable=None): a log file gets no carriage-return frames
    off = True if len(specs) < 2 else None
    for spec in tqdm(specs, desc="prepare datasets", unit="dataset", disable=off):
        try:
            t = load_transitions(spec, download=download)
            if len(t) == 0:
                raise InvdynError(f"{spec}: dataset has no transitions")
        except Exception as e:  # noqa: BLE001 - one bad dataset fails alone, with its reason
            failed.append(DatasetRecord(spec, spec, status="failed", error=f"{type(e).__name__}: {e}"))
            tqdm.write(f"dataset {spec}: FAILED to prepare: {e}")
            continue
        if t.name in ready:
            continue
        info = {
            k: t.stats.get(k) for k in ("transitions", "episodes", "obs_dim", "act_dim", "source", "env_id")
        }
        reason = selection.physics_reason(t)
        state = ray.put((t.qpos, t.qvel)) if keep_state and reason is None else None
        # Training needs no simulator state: qpos / qvel (float64) stay out of the trials' object.
        t = dataclasses.replace(t, qpos=None, qvel=None)
        ready[t.name] = PreparedDataset(t.name, spec, t.sha256, info, ray.put(t), reason, state)
    return ready, failed


def selection_options(job: JobConfig, pl: placement.Placement) -> selection.Options:
    return selection.Options(
        evaluate=job.evaluate,
        select_by=job.select_by,
        top=job.select_top,
        eval_config=job.evaluation,
        num_cpus=pl.cpus,  # an evaluation task holds a trial's CPUs
        ensemble=job.ensemble,
    )


def select_models(job: JobConfig, out, specs, ready, failed, trials, errors, job_name, opts) -> list:
    """Each model's record (pipeline.job.selection), one jump at a time: `collect` takes one model per
    dataset spec, and each k of `--jumps` makes one per spec."""
    records = []
    for i, k in enumerate(parse_jumps(job.jumps)):
        of_k = {n: d for n, d in ready.items() if d.jump == k}
        records += selection.collect(
            out, specs, of_k, failed if i == 0 else [], trials, errors, job_name, opts
        )
    return records


def plan_trials(job: JobConfig, todo: list, ready: dict) -> tuple[placement.Placement, list, bool]:
    """(placement, the Tune trials, whether they are populations): with `--population` (by default when
    trials get a GPU) one trial per dataset trains all of its search points (pipeline.job.populations)."""
    pl = decide_placement(job, len(todo))
    population = job.population
    if population is None:
        population = populations.default_on(pl.gpus, pl.cluster_gpus)
    if not population:
        return pl, todo, False
    pops = populations.make_populations(todo, ready)
    return decide_placement(job, len(pops)), pops, True


def decide_placement(job: JobConfig, n_trials: int) -> placement.Placement:
    return placement.decide(
        n_trials,
        cpus_per_trial=job.cpus_per_trial,
        gpus_per_trial=job.gpus_per_trial,
        max_concurrent=job.max_concurrent,
        start_ahead=job.executor == "train",  # trials reserve no CPU until their Train worker starts
    )


def storage_path(job: JobConfig, out: Path, pl: placement.Placement) -> str:
    """Where Tune and Train keep their state: --storage-path (local paths made absolute), else DIR/ray.
    Models never go there (pipeline.job.model_transfer), so a node-local path serves a cluster too."""
    storage = job.storage_path or str(out / "ray")
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def note_retries(records: list[DatasetRecord], retried: list[dict]) -> None:
    """summary.json: each dataset's attempts that failed and ran again (lost node, crash): why, which node."""
    fields = ("trial_id", "key", "node_id", "error")
    for rec in records:
        mine = [{k: r.get(k) for k in fields} for r in retried if r["dataset"] == rec.dataset]
        if mine:
            rec.info["trial_retries"] = mine


def crash_once(out: Path) -> CrashOnce | None:
    """The test hook of invdyn.settings.crash_once_dataset, with its marker file in DIR."""
    dataset = settings.crash_once_dataset()
    if not dataset:
        return None
    return CrashOnce(dataset, str(out / f".crash-once-{settings.dataset_model_name(dataset)}"))


def start_tracking(job: JobConfig, out: Path, job_name: str):
    """(tracking URI, the Tune callback that logs a run per trial), or (None, None) with --no-mlflow.
    Checks the tracking server before any training."""
    if not job.mlflow:
        return None, None
    from pipeline.registry import store
    from pipeline.registry.trial_logger import MlflowTrialLogger

    uri = store.resolve_uri(job.mlflow_uri, out)
    store.check_server(uri)
    return uri, MlflowTrialLogger(uri, job.experiment or job_name, job_name)


def register_and_export(job: JobConfig, uri: str | None, logger, records: list[DatasetRecord]) -> bool:
    """After all trials: register each dataset's model (driver only), then export the bundle. Failures
    leave the models in place (`python -m pipeline.register --from-storage OUT` finishes); returns False."""
    if uri is None:
        return True
    if job.register:
        from pipeline.registry.register import register_dataset

        for rec in records:
            if not rec.ok:
                continue
            record = {**rec.to_json(), "experiment": job.experiment or rec.job}
            run_id = logger.run_id(rec.trial_id) if logger is not None else None
            if run_id:
                record["mlflow_run_id"] = run_id
            try:
                rec.registration = register_dataset(uri, record)
            except Exception as e:  # noqa: BLE001 - keep the models; `pipeline.register` finishes later
                rec.registration = {"error": f"{type(e).__name__}: {e}"}
                print(f"warning: {rec.dataset}: not registered: {e}", file=sys.stderr)
    ok = not any("error" in (r.registration or {}) for r in records)
    if job.export:
        from pipeline.registry.export import export_bundle

        try:
            path = export_bundle(uri, job.export, datasets=[r.dataset for r in records if r.ok])
            print(f"bundle: {path}")
        except Exception as e:  # noqa: BLE001 - the summary says what was trained; export can be re-run
            print(
                f"error: export to {job.export} failed: {type(e).__name__}: {e}; "
                f"re-run `python -m pipeline.export --out {job.export}`",
                file=sys.stderr,
            )
            ok = False
    return ok


def write_report(job: JobConfig, repeats: list[split_repeats.Repeat]) -> bool:
    """--report DIR: the quality report of the chosen models, with CleanDiffuser's recipe trained beside;
    with --split-seeds one report over every repeat's summary (its "Over split seeds" table)."""
    summaries = [str(r.out / outputs.SUMMARY_JSON) for r in repeats if any(x.ok for x in r.records)]
    if not job.report or not summaries:
        return True
    from pipeline.quality import report

    print("\nreport: training CleanDiffuser's recipe on each dataset's training episodes for comparison")
    ev = job.evaluation  # the report measures what the job's evaluation measured, at the same sizes
    sizes = ["--horizon", str(ev.horizon), "--starts", str(ev.starts), "--samples", str(ev.samples)]
    if job.report_recipe_epochs is not None:
        sizes += ["--recipe-max-epochs", str(job.report_recipe_epochs)]
    return report.main(["--summary", *summaries, "--out", job.report, "--with-recipe", *sizes]) == 0


# ------------------------------------------------------------------------------------------ job.json


def last_run(out: Path, trials, todo, errors, started: float, tune_wall: float, pl) -> dict:
    """What this run did and where its time went (job.json "last_run")."""
    todo_keys = {t.key for t in todo}
    ran = [e for e in Ledger(out).done().values() if e.key in todo_keys]
    # a population's group trains and validates its members at once
    train_s = populations.shared_time(ran, "train_time_s")
    eval_s = populations.shared_time(ran, "eval_time_s")
    slot_s = tune_wall * pl.training_slots if ran and tune_wall else None
    return {
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
    }


def job_record(job: JobConfig, state, specs, storage, pl, space, uri, opts, timing: dict) -> dict:
    """DIR/job.json: the job's name and runs, what it was asked and how it ran."""
    shown = None
    if uri is not None:
        from invdyn._download import redact_url

        shown = redact_url(uri)
    return {
        **state,
        "datasets": specs,
        "storage_path": storage,
        "placement": dataclasses.asdict(pl),
        "search_space": space,
        "mlflow_uri": shown,
        "executor": job.executor,
        "selection": opts.to_json(),
        "last_run": timing,
    }


def _tracking_errors() -> tuple:
    """MLflow errors, when the MLflow module was loaded (it is imported only if tracking is on)."""
    store = sys.modules.get("pipeline.registry.store")
    return (store.TrackingError,) if store else ()


if __name__ == "__main__":
    sys.exit(main())
