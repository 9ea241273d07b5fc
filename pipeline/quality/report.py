"""Quality report: per dataset, the chosen model vs the CleanDiffuser recipe vs the mean-action baseline.

`python -m pipeline.report --summary DIR/summary.json --out REPORT_DIR [--with-recipe]`
`python -m pipeline.report --models MODEL_DIR... --out REPORT_DIR [--with-recipe]`

Writes REPORT_DIR/report.md (tables), results.json (every number) and PNG plots (pipeline.quality.plots).
Every model is scored on its test episodes (its validation episodes if it was trained before test parts;
the report says which). With --with-recipe, CleanDiffuser's recipe is trained on the champion's train and
validation episodes (what the champion's choices saw) and scored on the same test episodes. Several
summaries (one per split seed: `--summary a/summary.json b/summary.json`, as `pretrain_all --split-seeds`
writes) add a table of mean ± std, min and max over the splits (pipeline.training.repeats), also written to
REPORT_DIR/over_splits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from invdyn.errors import InvdynError
from pipeline.dataclass_cli import add_options, from_namespace
from pipeline.quality import over_splits, plots
from pipeline.quality.evaluate import EvalConfig
from pipeline.quality.metrics import fmt_number
from pipeline.quality.recipe import train_recipe

#: "well served": held-out MSE under this fraction of the mean-action baseline's ...
WELL_SERVED_MSE = 0.1
#: ... and tracking drift at H under this fraction of the mean-action baseline's drift
WELL_SERVED_DRIFT = 0.25
#: training settings shown per champion in the report (the ones the search varies)
CONFIG_KEYS = (
    "candidate",
    "arch",
    "hidden_dim",
    "dropout",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "loss",
    "batch_size",
    "max_epochs",
    "patience",
    "split",
    "keep",
)
#: (key in an evaluation result, label) of the metrics in the main table
METRICS = (
    ("heldout_mse", "action MSE"),
    ("one_step_error", "one-step state error"),
    ("tracking_drift", "tracking drift at H"),
)
#: the mean-action baseline's value of each metric
BASELINE_OF = {
    "heldout_mse": "baseline_mse",
    "one_step_error": "one_step_baseline",
    "tracking_drift": "tracking_baseline",
}


# ---------------------------------------------------------------- collecting results


def evaluate_record(
    record: dict,
    *,
    with_recipe: bool,
    work_dir: Path,
    config: EvalConfig | None = None,
    recipe_max_epochs: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one champion (and optionally the recipe on the same split) -> a report entry."""
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.quality.evaluate import evaluate, heldout_rows, part_of

    config = config or EvalConfig()
    model = invdyn.read_model_dir(record["model_dir"])
    transitions = load_transitions(
        record.get("spec") or record.get("dataset") or model.params["dataset"]["name"]
    )
    rows = heldout_rows(transitions, model.params, part=None)  # test, when the model has a test part
    kw = {
        "horizon": config.horizon,
        "tracking_starts": config.starts,
        "one_step_samples": config.samples,
        "seed": config.seed,
        "rows": rows,
        "progress": progress,
    }
    entry = {
        "dataset": transitions.name,
        "part": part_of(rows[2]),
        "split_seed": split_seed_of(model.params),
        "champion": evaluate(model, transitions, **kw),
        "champion_dir": str(record["model_dir"]),
        "champion_curve": model.params.get("learning_curve") or [],
        "champion_config": record.get("config") or model.params.get("training") or {},
        "recipe": None,
    }
    if with_recipe:
        work = work_dir / "recipe" / transitions.name
        fit_rows = _non_test_rows(transitions, model.params, rows)
        trained = train_recipe(transitions, fit_rows, work, max_epochs=recipe_max_epochs, threads=threads)
        recipe = invdyn.read_model_dir(trained.model_dir)
        entry.update(
            recipe=evaluate(recipe, transitions, **kw),
            recipe_dir=str(trained.model_dir),
            recipe_curve=recipe.params.get("learning_curve") or [],
        )
    return entry


def _non_test_rows(transitions, params: dict, rows) -> np.ndarray:
    """The rows the champion's choices saw (train + validation) when it is scored on its test part; else its
    training rows (the validation rows are the scored ones)."""
    from pipeline.quality.evaluate import part_of
    from pipeline.training.split import split_from_training

    if part_of(rows[2]) != "test":
        return rows[0]
    train, val, _ = split_from_training(transitions, params["training"])
    return np.sort(np.concatenate([train, val]))


def split_seed_of(params: dict):
    """The split seed a model's params.json records (None: none recorded)."""
    training = (params or {}).get("training") or {}
    split = training.get("split")
    if isinstance(split, dict):
        return split.get("seed")
    return training.get("seed") if split else None


def read_summary(path) -> list[dict]:
    """The pipeline's DIR/summary.json: a list of {dataset, model_dir, ...}; relative dirs are next to it."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvdynError(
            f"{path} does not exist: run `python -m pipeline.pretrain_all` first, or pass --models"
        ) from None
    except json.JSONDecodeError as e:
        raise InvdynError(f"{path} is not valid JSON ({e})") from None
    if isinstance(records, dict):
        records = records.get("datasets") or records.get("records") or []
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and rec.get("status") == "failed":
            out.append(rec)  # shown in the report as failed, not evaluated
            continue
        if not isinstance(rec, dict) or not rec.get("model_dir"):
            raise InvdynError(f"{path}: record {i} has no 'model_dir' (got {rec!r:.120})")
        model_dir = Path(rec["model_dir"])
        out.append({**rec, "model_dir": model_dir if model_dir.is_absolute() else path.parent / model_dir})
    return out


# ---------------------------------------------------------------- writing the report


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def verdict(result: dict) -> str:
    """One word a user can scan: is this dataset well served by its model?"""
    mse = _ratio(result.get("heldout_mse"), result.get("baseline_mse"))
    drift = _ratio(result.get("tracking_drift"), result.get("tracking_baseline"))
    if mse is None:
        return "n/a"
    if mse <= WELL_SERVED_MSE and (drift is None or drift <= WELL_SERVED_DRIFT):
        return "well served" + (" (no physics check)" if drift is None else "")
    return "weak"


def _at_a_glance(entries: list[dict], horizon: int) -> list[str]:
    lines = [
        "## At a glance",
        "",
        "| dataset | action MSE / baseline | mean R² | tracking drift / baseline | verdict |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        c = e["champion"]
        r2 = [v for v in c.get("per_dim_r2") or [] if v is not None]
        drift = _ratio(c.get("tracking_drift"), c.get("tracking_baseline"))
        lines.append(
            f"| {e['dataset']} | {fmt_number(_ratio(c['heldout_mse'], c['baseline_mse']), '.3g')} | "
            f"{fmt_number(float(np.mean(r2)) if r2 else None, '.3g')} | {fmt_number(drift, '.3g')} | "
            f"{verdict(c)} |"
        )
    return lines + [
        "",
        f"Well served: action MSE below {WELL_SERVED_MSE:g}x and {horizon}-step drift below "
        f"{WELL_SERVED_DRIFT:g}x the mean-action baseline's.",
    ]


def _versus_recipe(entries: list[dict], horizon: int) -> list[str]:
    lines = [
        "## Champion vs CleanDiffuser recipe vs mean-action baseline",
        "",
        "| dataset | metric | champion | recipe | baseline | champion / recipe |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        c, r = e["champion"], e.get("recipe") or {}
        for key, label in METRICS:
            label = label.replace("at H", f"at {horizon}")
            ratio = fmt_number(_ratio(c.get(key), r.get(key)), ".3g")
            lines.append(
                f"| {e['dataset']} | {label} | {fmt_number(c.get(key))} | {fmt_number(r.get(key))} | "
                f"{fmt_number(c.get(BASELINE_OF[key]))} | {ratio} |"
            )
    if not any(e.get("recipe") for e in entries):
        lines += [
            "",
            "Recipe column empty: run with `--with-recipe` to train and score CleanDiffuser's recipe.",
        ]
    return lines


def _notes(entries: list[dict], failed) -> list[str]:
    lines = []
    if failed:
        lines += ["", "Datasets whose training failed (no model to evaluate):", ""]
        lines += [f"- {rec.get('dataset')}: {rec.get('error', 'unknown error')}" for rec in failed]
    notes = [
        f"- {e['dataset']}: {e['champion']['physics_reason']}"
        for e in entries
        if e["champion"].get("physics_reason")
    ]
    if notes:
        lines += ["", "Physics metrics not available:", "", *notes]
    return lines


def _models(entries: list[dict]) -> list[str]:
    lines = [
        "## Plots",
        "",
        *[f"![{title}]({name})\n" for name, title, _ in plots.PLOTS],
        "## Models",
        "",
        "| dataset | champion | training config |",
        "|---|---|---|",
    ]
    for e in entries:
        config = e.get("champion_config") or {}
        cfg = ", ".join(f"{k}={config[k]}" for k in CONFIG_KEYS if k in config)
        lines.append(f"| {e['dataset']} | `{e['champion_dir']}` | {cfg} |")
    return lines


def _over_splits(entries: list[dict], horizon: int) -> list[str]:
    labels = {key: label.replace("at H", f"at {horizon}") for key, label in METRICS}
    return over_splits.section(over_splits.summarize(entries, BASELINE_OF), labels)


def markdown(entries: list[dict], horizon: int, failed: list[dict] = ()) -> str:
    parts = sorted({e.get("part", "val") for e in entries})
    where = {
        ("test",): "test episodes, which no choice (early stop, kept weights, search, champion) read",
        ("val",): "validation episodes (models trained before test parts): optimistic, they made the choices",
    }.get(tuple(parts), "each model's test episodes, or validation episodes where it has none (column part)")
    intro = (
        f"Every number is measured on {where}; the model never trained on them. Physics metrics are the "
        "normalized-state RMSE between where MuJoCo goes under the predicted actions and the recorded "
        f"trajectory: one step from the recorded state, and after {horizon} closed-loop steps (tracking "
        "drift). The mean-action baseline applies the training data's mean action; lower is better "
        "everywhere."
    )
    # a dataset measured on several splits has a row per split in the tables of single models
    names = [e["dataset"] for e in entries]
    each = [
        {**e, "dataset": f"{e['dataset']} (split {e.get('split_seed')})"}
        if names.count(e["dataset"]) > 1
        else e
        for e in entries
    ]
    lines = ["# invdyn quality report", "", intro, "", *_at_a_glance(each, horizon), ""]
    lines += [*_versus_recipe(each, horizon), "", *_over_splits(entries, horizon)]
    lines += [*_notes(each, failed), "", *_models(each)]
    return "\n".join(lines) + "\n"


def write_report(
    entries: list[dict], out_dir, horizon: int = EvalConfig.horizon, failed: list[dict] = ()
) -> Path:
    """Write report.md, results.json and the PNGs into `out_dir` (each file atomically)."""
    from invdyn._files import atomic_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.write_plots(entries, out_dir)
    with atomic_file(out_dir / "results.json", "w") as f:
        json.dump(entries, f, indent=2, sort_keys=True, default=str)
    repeated = over_splits.summarize(entries, BASELINE_OF)
    if repeated:
        with atomic_file(out_dir / over_splits.OVER_SPLITS_JSON, "w") as f:
            json.dump(repeated, f, indent=2, sort_keys=True)
    with atomic_file(out_dir / "report.md", "w") as f:
        f.write(markdown(entries, horizon, failed))
    return out_dir / "report.md"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--summary",
        nargs="+",
        help="summary.json of pipeline.pretrain_all (several: one per split seed, summarized over them)",
    )
    src.add_argument(
        "--models", nargs="+", metavar="MODEL_DIR", help="model directories (dataset from params.json)"
    )
    ap.add_argument("--out", required=True, help="report directory (report.md, results.json, *.png)")
    ap.add_argument(
        "--with-recipe", action="store_true", help="train + score CleanDiffuser's recipe on the same split"
    )
    ap.add_argument(
        "--recipe-max-epochs", type=int, default=None, help="cap the recipe's epochs (default: its own stop)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads for the recipe's training (default: all)"
    )
    add_options(ap, EvalConfig)
    return ap


def check_records(records: list[dict], out) -> None:
    """Before any evaluation (which may simulate a dataset or train the recipe): every model loads, every
    dataset spec is known, and the report folder is writable."""
    import invdyn
    from invdyn._files import check_writable
    from pipeline.data.catalog import CATALOG, DatasetMissingError
    from pipeline.data.sources import locate

    for rec in records:
        model = invdyn.read_model_dir(rec["model_dir"])
        spec = rec.get("spec") or rec.get("dataset") or model.params.get("dataset", {}).get("name")
        if not spec:
            raise InvdynError(f"{rec['model_dir']}: params.json names no dataset; pass it in a summary.json")
        try:
            locate(spec, simulate=False)
        except DatasetMissingError:
            if not CATALOG.get(spec, {}).get("simulated"):
                raise  # a simulated set is made when evaluated; anything else missing stays missing
    check_writable(Path(out))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    config = from_namespace(EvalConfig, args)
    from tqdm.auto import tqdm

    try:
        config.validate()
        for flag, value in (("--recipe-max-epochs", args.recipe_max_epochs), ("--threads", args.threads)):
            if value is not None and value < 1:
                raise InvdynError(f"{flag} must be >= 1, got {value}")
        records = (
            [rec for path in args.summary for rec in read_summary(path)]
            if args.summary
            else [{"model_dir": Path(m)} for m in args.models]
        )
        failed = [rec for rec in records if rec.get("status") == "failed"]
        todo = [r for r in records if r not in failed]
        check_records(todo, args.out)
        kw = {"recipe_max_epochs": args.recipe_max_epochs, "threads": args.threads, "config": config}
        kw["progress"] = sys.stderr.isatty()  # bars on a terminal, never carriage returns in a log
        entries = [
            evaluate_record(rec, with_recipe=args.with_recipe, work_dir=Path(args.out), **kw)
            for rec in tqdm(todo, desc="report", unit="dataset", disable=None)  # None: a bar on a terminal
        ]
        path = write_report(entries, args.out, config.horizon, failed=failed)
    except (InvdynError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
