"""Which trial becomes a dataset's model: `pretrain_all --select-by {heldout_mse,one_step_error,tracking_drift}`.

After the trials, the job evaluates (pipeline.quality.evaluate) the best `--select-top` finished trials of each
dataset by held-out MSE on the held-out episodes of their own training split, in MuJoCo, as Ray tasks
that each hold a trial's CPUs (so a cluster evaluates them in parallel), and keeps the one with the
lowest `--select-by` metric. With the default `heldout_mse` only the best trial by held-out MSE is
evaluated, for its model card and registry tags. Only the top K by held-out MSE are evaluated because a
trial far behind on action error is not worth its MuJoCo time (default K = 3; 0 = every trial).

A dataset that cannot be simulated (no `infos/qpos` / `infos/qvel`, or no known environment) gets the
non-physics metrics, and is selected by held-out MSE with a one-line note.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

from pipeline.quality.evaluate import SELECT_METRICS, headline

DEFAULT_TOP = 3


@dataclasses.dataclass
class Options:
    """What `--evaluate` / `--select-by` asked for (and what an evaluation task holds)."""

    evaluate: bool = True
    select_by: str = "heldout_mse"
    top: int = DEFAULT_TOP
    horizon: int = 32
    starts: int = 128
    samples: int = 2000
    seed: int = 0
    num_cpus: float = 1.0


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


def _mse(entry: dict) -> float | None:
    try:
        v = float(entry.get("heldout_mse"))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def candidates(entries: list[dict], opts: Options, simulatable: bool) -> list[dict]:
    """The finished trials to evaluate, best held-out MSE first (ties: by key, for a stable choice)."""
    ranked = sorted((e for e in entries if _mse(e) is not None), key=lambda e: (_mse(e), e["key"]))
    if opts.select_by == "heldout_mse" or not simulatable:
        return ranked[:1]
    return ranked[: opts.top] if opts.top > 0 else ranked


def _evaluate_task(checkpoint_path: str, data, state, reason: str | None, opts: dict) -> dict:
    """Ray task: fetch a trial's model directory from the storage path and evaluate it."""
    import torch

    import invdyn
    from pipeline.job.pretrain_all import fetch_model
    from pipeline.quality.evaluate import evaluate

    torch.set_num_threads(max(1, int(opts["num_cpus"])))
    if state is not None:
        data = dataclasses.replace(data, qpos=state[0], qvel=state[1])
    with tempfile.TemporaryDirectory(prefix="invdyn-eval-") as tmp:
        model = invdyn.read_model_dir(fetch_model(checkpoint_path, Path(tmp) / "model"))
        result = evaluate(
            model,
            data,
            horizon=opts["horizon"],
            physics=reason is None,
            seed=opts["seed"],
            one_step_samples=opts["samples"],
            tracking_starts=opts["starts"],
        )
    if reason is not None:
        result["physics_reason"] = reason
    result["weights_sha256"] = (model.params.get("weights") or {}).get("sha256")
    return result


def evaluate_all(todo: dict[str, list[dict]], ready: dict, opts: Options) -> dict[str, dict]:
    """Evaluate every candidate ({dataset: [ledger entries]}) as parallel Ray tasks, with a progress bar.

    Returns {trial key: evaluation result}; a task that failed gives {"error": ...} (that candidate
    simply has no metric, the others still count).
    """
    import ray
    from tqdm.auto import tqdm

    task = ray.remote(_evaluate_task).options(num_cpus=opts.num_cpus, max_retries=1)
    kw = dataclasses.asdict(opts)
    refs = {}
    for name, entries in todo.items():
        d = ready[name]
        for e in entries:
            refs[
                task.remote(e["checkpoint_path"], d["ref"], d.get("state_ref"), d.get("physics_reason"), kw)
            ] = e
    results: dict[str, dict] = {}
    pending = list(refs)
    with tqdm(total=len(pending), desc="evaluate in MuJoCo", unit="model", disable=not pending) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            entry = refs[done[0]]
            try:
                results[entry["key"]] = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - one failed evaluation costs one candidate, not the job
                results[entry["key"]] = {
                    "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                }
                tqdm.write(
                    f"warning: evaluation of {entry['dataset']} trial {entry.get('trial_id')} failed: "
                    f"{results[entry['key']]['error']}"
                )
            bar.update()
    return results


def choose(cands: list[dict], results: dict[str, dict], opts: Options, reason: str | None) -> dict:
    """The selected entry among `cands` (best held-out MSE first) and how: {"entry", "selected_by",
    "note", "candidates"}. Without a finite `--select-by` value for any candidate: held-out MSE."""
    metric = opts.select_by
    table = []
    for e in cands:
        r = results.get(e["key"]) or {}
        row = {"key": e["key"], "trial_id": e.get("trial_id"), "heldout_mse": _mse(e)}
        row.update({m: r.get(m) for m in SELECT_METRICS if m != "heldout_mse"})
        if r.get("error"):
            row["error"] = r["error"]
        table.append(row)
    note = None
    if metric != "heldout_mse":
        scored = [
            (row[metric], row["heldout_mse"], row["key"], e)
            for row, e in zip(table, cands, strict=True)
            if isinstance(row[metric], (int, float)) and math.isfinite(row[metric])
        ]
        if scored:
            return {
                "entry": min(scored, key=lambda s: s[:3])[3],
                "selected_by": metric,
                "note": None,
                "candidates": table,
            }
        said = [
            r.get("physics_reason") or r.get("error") for r in (results.get(c["key"]) or {} for c in cands)
        ]
        why = reason or next((w for w in said if w), "no finite value")
        note = f"{metric} unavailable ({why}): selected by heldout_mse"
    return {"entry": cands[0], "selected_by": "heldout_mse", "note": note, "candidates": table}


def record_fields(choice: dict, result: dict | None, opts: Options) -> dict:
    """What a summary.json record gets from the selection: selected_by, champion_metric (the rule the
    registry applies), evaluation (headline metrics of the selected model), candidates, selection_note."""
    out = {
        "selected_by": choice["selected_by"],
        "champion_metric": opts.select_by,
        "candidates": choice["candidates"],
    }
    if choice.get("note"):
        out["selection_note"] = choice["note"]
    if result and not result.get("error"):
        out["evaluation"] = headline(result)
    elif result:
        out["evaluation_error"] = result["error"]
    return out
