"""Which trial becomes a dataset's model (`pretrain_all --select-by`), and the job's record of it.

After the trials, the job evaluates (pipeline.quality.evaluate) the best `--select-top` finished trials
of each dataset by held-out MSE on the held-out episodes of their own training split, in MuJoCo, as Ray
tasks that each hold a trial's CPUs (so a cluster evaluates them in parallel), and keeps the one with the
lowest `--select-by` metric (pipeline.quality.metrics.rank: the registry's champion rule too). With the
default `heldout_mse` only the best trial by held-out MSE is evaluated, for its model card and registry
tags. Only the top K by held-out MSE are evaluated because a trial far behind on action error is not
worth its MuJoCo time (default K = 3; 0 = every trial).

A dataset that cannot be simulated (no `infos/qpos` / `infos/qvel`, or no known environment) gets the
non-physics metrics, and is selected by held-out MSE with a one-line note.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from invdyn.settings import dataset_model_name
from pipeline.job.config import DEFAULT_TOP
from pipeline.job.console import config_value, varying_fields
from pipeline.job.model_transfer import put_dir
from pipeline.job.outputs import Ledger, write_curves
from pipeline.job.records import TEST_METRICS, DatasetRecord, PreparedDataset, TrialResult, TrialSpec
from pipeline.job.trials import fetch_model
from pipeline.quality.evaluate import EvalConfig, attach_evaluation
from pipeline.quality.metrics import (
    DEFAULT_METRIC,
    SELECT_METRICS,
    Candidate,
    finite,
    fmt_number,
    headline,
    rank,
)

#: what a dataset's record copies from its selected trial
FROM_TRIAL = (
    "heldout_mse",
    "test_mse",
    "test_mse_normalized",
    "test_r2",
    "test_baseline_mse",
    "baseline_mse",
    "config",
    "checkpoint_path",
    "epochs",
    "wall_s",
    "train_time_s",
    "trial_id",
    "key",
    "node_ip",
)


@dataclass
class Options:
    """What `--evaluate` / `--select-by` asked for (and what an evaluation task holds)."""

    evaluate: bool = True  # evaluate the selected model (and the candidates of a physics metric)
    select_by: str = DEFAULT_METRIC  # pipeline.quality.metrics.SELECT_METRICS
    top: int = DEFAULT_TOP  # candidates of a physics metric, best by held-out MSE first; 0: all
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    num_cpus: float = 1.0  # CPUs of an evaluation task (a trial's)
    ensemble: int = 1  # K > 1: the model is an ensemble of the selected trial and the next best K-1

    def to_json(self) -> dict:
        """As job.json records it (flat)."""
        ev = self.eval_config
        return {
            "evaluate": self.evaluate,
            "select_by": self.select_by,
            "top": self.top,
            "horizon": ev.horizon,
            "starts": ev.starts,
            "samples": ev.samples,
            "seed": ev.seed,
            "closed_loop_episodes": ev.closed_loop_episodes,
            "closed_loop_noise": ev.closed_loop_noise,
            "closed_loop_planner": ev.closed_loop_planner,
            "num_cpus": self.num_cpus,
            "ensemble": self.ensemble,
        }


@dataclass
class Choice:
    """The trial selected among a dataset's candidates, and how."""

    entry: TrialResult
    selected_by: str  # the metric that decided (held-out MSE when the asked-for one was missing)
    note: str | None  # why the asked-for metric did not decide
    table: list[dict]  # every candidate with its metrics (summary.json's "candidates")


def physics_reason(transitions) -> str | None:
    """None when the dataset can be replayed in MuJoCo, else why not (one line)."""
    from pipeline.sim.physics import PhysicsUnavailable, env_id_for

    if transitions.qpos is None or transitions.qvel is None:
        return f"{transitions.name} has no recorded simulator state (HDF5 keys infos/qpos, infos/qvel)"
    try:
        env_id_for(transitions)
    except PhysicsUnavailable as e:
        return str(e)
    return None


def candidates(entries: list[TrialResult], opts: Options, simulatable: bool) -> list[TrialResult]:
    """The finished trials to evaluate, best held-out MSE first (the ranking rule of
    pipeline.quality.metrics; ties: by key, for a stable choice)."""
    by_key = {e.key: e for e in entries}
    _, ranked = rank([Candidate(e.key, {DEFAULT_METRIC: e.heldout_mse}, (e.key,)) for e in entries])
    best_first = [by_key[c.ident] for c in ranked]
    if opts.select_by == DEFAULT_METRIC or (not simulatable and opts.select_by != "plan_return"):
        return best_first[:1]
    return best_first[: opts.top] if opts.top > 0 else best_first


def _evaluate_task(
    checkpoint_path: str, data, state, reason: str | None, opts: Options, part: str | None = "val"
) -> dict:
    """Ray task: unpack a trial's model directory (`checkpoint_path`: its bytes, packed and checked by
    pipeline.job.model_transfer) and evaluate it on `part` of its split ("val" to choose among candidates;
    None: the test part, or val for a model without one)."""
    import torch

    import invdyn
    from pipeline.quality.evaluate import evaluate

    torch.set_num_threads(max(1, int(opts.num_cpus)))
    if state is not None:
        data = dataclasses.replace(data, qpos=state[0], qvel=state[1])
    ev = opts.eval_config
    with tempfile.TemporaryDirectory(prefix="invdyn-eval-") as tmp:
        model = invdyn.read_model_dir(fetch_model(checkpoint_path, Path(tmp) / "model"))
        result = evaluate(
            model,
            data,
            horizon=ev.horizon,
            physics=reason is None,
            seed=ev.seed,
            one_step_samples=ev.samples,
            tracking_starts=ev.starts,
            part=part,
            closed_loop=closed_loop_for(opts, part, reason),
        )
    if reason is not None:
        result["physics_reason"] = reason
    result["weights_sha256"] = (model.params.get("weights") or {}).get("sha256")
    return result


def closed_loop_for(opts: Options, part: str | None, reason: str | None):
    """The closed loop an evaluation task runs: the report's (test seeds) always, a choice's (validation
    seeds) only when plan return chooses. It needs no recorded states: a dataset without an env or agent
    gets its reason from the closed loop itself."""
    if part == "val" and opts.select_by != "plan_return":
        return None
    return opts.eval_config.closed_loop("val" if part == "val" else "test")


def evaluate_all(
    todo: dict[str, list[TrialResult]], ready: dict[str, PreparedDataset], opts: Options, part="val"
) -> dict[str, dict]:
    """Evaluate every candidate ({dataset: [ledger entries]}) on `part` as parallel Ray tasks, with a
    progress bar.

    Returns {trial key: evaluation result}; a task that failed gives {"error": ...} (that candidate
    simply has no metric, the others still count).
    """
    import ray
    from tqdm.auto import tqdm

    task = ray.remote(_evaluate_task).options(num_cpus=opts.num_cpus, max_retries=1)
    refs = {}
    for name, entries in todo.items():
        d = ready[name]
        for e in entries:
            # the model's bytes, not its path: the task may run on a node that cannot see the driver's files
            model = put_dir(e.checkpoint_path)
            refs[task.remote(model, d.ref, d.state_ref, d.physics_reason, opts, part)] = e
    results: dict[str, dict] = {}
    pending = list(refs)
    # a bar only on a terminal (tqdm's disable=None): a log file gets no carriage-return frames
    off = True if not pending else None
    desc = "evaluate in MuJoCo" + (" (choosing: validation episodes)" if part == "val" else "")
    with tqdm(total=len(pending), desc=desc, unit="model", disable=off) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            entry = refs[done[0]]
            try:
                results[entry.key] = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - one failed evaluation costs one candidate, not the job
                results[entry.key] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
                tqdm.write(
                    f"warning: evaluation of {entry.dataset} trial {entry.trial_id} failed: "
                    f"{results[entry.key]['error']}"
                )
            bar.update()
    return results


def choose(cands: list[TrialResult], results: dict[str, dict], opts: Options, reason: str | None) -> Choice:
    """The selected entry among `cands` (best held-out MSE first) by the ranking rule of
    pipeline.quality.metrics: `--select-by`, or held-out MSE where no candidate has a finite value of it."""
    table, contenders = [], []
    for e in cands:
        r = results.get(e.key) or {}
        scores = {DEFAULT_METRIC: finite(e.heldout_mse)}
        scores.update({m: r.get(m) for m in SELECT_METRICS if m != DEFAULT_METRIC})
        row = {"key": e.key, "trial_id": e.trial_id, **scores}
        if r.get("error"):
            row["error"] = r["error"]
        table.append(row)
        contenders.append(Candidate(e.key, scores, (e.key,)))
    rule, ranked = rank(contenders, opts.select_by)
    by_key = {e.key: e for e in cands}
    entry = by_key[ranked[0].ident] if ranked else cands[0]
    note = None
    if rule != opts.select_by:
        field = "closed_loop_reason" if opts.select_by == "plan_return" else "physics_reason"
        said = [r.get(field) or r.get("error") for r in (results.get(c.key) or {} for c in cands)]
        why = (None if opts.select_by == "plan_return" else reason) or next(
            (w for w in said if w), "no value"
        )
        note = f"{opts.select_by} unavailable ({why}): selected by {rule}"
    return Choice(entry, rule, note, table)


# --------------------------------------------------------------------------- one record per dataset


def collect(
    out: Path,
    datasets: list[str],
    ready: dict[str, PreparedDataset],
    failed: list[DatasetRecord],
    trials: list[TrialSpec],
    errors: dict[str, str],
    job_name: str,
    opts: Options | None = None,
) -> list[DatasetRecord]:
    """One record per dataset: the selected trial's metrics, evaluation and model dir, or why it failed.

    Without `opts` (or with `opts.evaluate` off) the trial with the best held-out MSE, unevaluated; else
    the candidates are evaluated as Ray tasks and the result written into the selected model directory
    (card + params.json) before anything registers it.
    """
    opts = opts or Options(evaluate=False)
    done = Ledger(out).done()
    failed_by_spec = {f.spec: f for f in failed}
    by_spec = {d.spec: d for d in ready.values()}
    records, chosen = [], {}
    for spec in datasets:
        if spec in failed_by_spec:
            records.append(failed_by_spec[spec])
            continue
        d = by_spec.get(spec)
        if d is None or any(r.dataset == d.name for r in records):
            continue
        rec, cands, entries = _dataset_record(out, d, trials, done, errors, job_name, opts)
        records.append(rec)
        if cands:
            chosen[d.name] = (rec, cands, entries)
    # Candidates that a physics metric chooses between are evaluated on their validation episodes; the model
    # kept is then evaluated on its test episodes, which is what its card, summary.json and the registry say.
    choosing = {n: c for n, (_, c, _) in chosen.items() if len(c) > 1}
    results = evaluate_all(choosing, ready, opts) if opts.evaluate and choosing else {}
    choices = {
        name: choose(c, results, opts, ready[name].physics_reason) for name, (_, c, _) in chosen.items()
    }
    kept = {name: [choice.entry] for name, choice in choices.items()}
    reported = evaluate_all(kept, ready, opts, part=None) if opts.evaluate else {}
    for name, (rec, cands, entries) in chosen.items():
        _select(out, rec, choices[name], len(cands), reported, ready[name], opts, entries)
    return records


def _dataset_record(out, d: PreparedDataset, trials, done, errors, job_name, opts):
    """(the dataset's record so far, its candidates, its finished trials); a dataset without a finished
    trial is failed."""
    keys = [t.key for t in trials if t.dataset == d.name]
    entries = [done[k] for k in keys if k in done]
    rec = DatasetRecord(
        dataset=d.name,
        spec=d.spec,
        sha256=d.sha256,
        trials=len(keys),
        trials_finished=len(entries),
        job=job_name,
        info=dict(d.info),
    )
    if entries:
        rec.curves = str(write_curves(out, d.name, entries))
        rec.population = max((e.population or {}).get("members", 0) for e in entries) or None
    cands = candidates(entries, opts, d.physics_reason is None)
    if not cands:
        errs = [errors[k] for k in keys if k in errors]
        rec.status, rec.error = "failed", errs[0] if errs else "no trial finished"
        return rec, [], entries
    rec.trials_failed = sum(1 for k in keys if k in errors and k not in done)
    return rec, cands, entries


def _select(
    out: Path,
    rec: DatasetRecord,
    choice: Choice,
    n_cands: int,
    reported: dict,
    d: PreparedDataset,
    opts,
    entries,
):
    """Copy the chosen model to DIR/models/<name>/ with its (test-part) evaluation, fill its record."""
    best = choice.entry
    target = Path(out) / "models" / dataset_model_name(d.name)
    if opts.ensemble > 1:
        members = ensemble_members(list(entries) or [best], best, opts.ensemble)
        model_dir = _write_ensemble(target, members, d)
        rec.info["ensemble"] = [
            {"trial_id": e.trial_id, "key": e.key, "heldout_mse": e.heldout_mse, "config": e.config}
            for e in members
        ]
    else:
        model_dir = fetch_model(best.checkpoint_path, target)
    result = reported.get(best.key)
    if result and not result.get("error"):
        attach_evaluation(model_dir, result)  # before registration: the registered card shows it
    rec.selected_by = choice.selected_by
    if rec.population:  # every search point of a population, with its own metrics, best held-out first
        rec.candidates = population_table(choice.table, entries)
    if opts.evaluate:
        rec.champion_metric, rec.selection_note = opts.select_by, choice.note
        rec.candidates = rec.candidates or choice.table
        if result and not result.get("error"):
            rec.evaluation = headline(result)
        elif result:
            rec.evaluation_error = result["error"]
        print(_selection_line(rec, choice, n_cands, d.physics_reason))
    rec.status, rec.model_dir = "ok", str(model_dir.resolve())
    for name in FROM_TRIAL:
        setattr(rec, name, getattr(best, name))


def population_table(evaluated: list[dict], entries) -> list[dict]:
    """summary.json's candidates of a population: every member (search point) with its held-out and test
    metrics, its point and shape group; the evaluated ones also carry their evaluation's metrics."""
    rows = {row["key"]: row for row in evaluated}
    varying = varying_fields([e.config for e in entries])
    _, ranked = rank([Candidate(e.key, {DEFAULT_METRIC: e.heldout_mse}, (e.key,)) for e in entries])
    order = [c.ident for c in ranked] + sorted(e.key for e in entries if finite(e.heldout_mse) is None)
    by_key = {e.key: e for e in entries}
    table = []
    for key in order:
        e = by_key[key]
        row = rows.get(key) or {"key": key, "trial_id": e.trial_id, DEFAULT_METRIC: finite(e.heldout_mse)}
        tests = {m: getattr(e, m) for m in TEST_METRICS if getattr(e, m) is not None}
        point = {k: config_value(e.config, k) for k in varying}
        group = (e.population or {}).get("group")
        table.append({**row, **tests, "point": point, "group": group, "evaluated": key in rows})
    return table


def ensemble_members(entries: list[TrialResult], best: TrialResult, k: int) -> list[TrialResult]:
    """The selected trial first, then the best others by the ranking rule on held-out MSE (ties: by key),
    `k` in all (fewer when fewer trials finished)."""
    others = [e for e in entries if e.key != best.key]
    _, ranked = rank([Candidate(e.key, {DEFAULT_METRIC: e.heldout_mse}, (e.key,)) for e in others])
    by_key = {e.key: e for e in others}
    return [best, *(by_key[c.ident] for c in ranked)][:k]


def _write_ensemble(target: Path, members: list[TrialResult], d: PreparedDataset) -> Path:
    """Fetch the members' model directories and write them as one ensemble at `target`."""
    import ray

    from pipeline.training.ensemble import write_ensemble

    if len(members) < 2:
        print(f"{d.name}: only 1 finished trial, so its model is a single model, not an ensemble")
        return fetch_model(members[0].checkpoint_path, target)
    with tempfile.TemporaryDirectory(prefix="invdyn-members-") as tmp:
        dirs = [fetch_model(e.checkpoint_path, Path(tmp) / str(i)) for i, e in enumerate(members)]
        data = ray.get(d.ref) if d.ref is not None else None  # calibrates the score on real pairs
        return write_ensemble(target, dirs, transitions=data)


def _ratios(rows: list[dict]) -> str:
    """ "σ=0: 0.99x its actor, σ=0.05: 0.97x its actor" of closed-loop rows."""
    return ", ".join(
        f"σ={r['plan_noise']:g}: {fmt_number(r['return_ratio'], '.2f')}x the {r['planner']} actor"
        for r in rows
    )


def _selection_line(rec: DatasetRecord, choice: Choice, evaluated: int, reason: str | None) -> str:
    ev = rec.evaluation or {}
    line = (
        f"{rec.dataset}: trial {choice.entry.trial_id} selected by {choice.selected_by} of {evaluated} "
        f"evaluated: held-out MSE {fmt_number(choice.entry.heldout_mse)}, one-step error "
        f"{fmt_number(ev.get('one_step_error'))}, tracking drift {fmt_number(ev.get('tracking_drift'))}"
    )
    if ev.get("plan_return") is not None:
        line += f", plan return {fmt_number(ev['plan_return'], '.1f')} ({_ratios(ev['closed_loop'])})"
    if choice.note:
        return f"{line}; note: {choice.note}"
    if reason:
        return f"{line}; note: cannot be simulated ({reason}), non-physics metrics only"
    return line
