"""Quality report: per dataset, the champion vs the CleanDiffuser recipe vs the mean-action baseline.

`python -m pipeline.report --summary DIR/summary.json --out REPORT_DIR [--with-recipe]`
`python -m pipeline.report --models MODEL_DIR... --out REPORT_DIR [--with-recipe]`

Writes REPORT_DIR/report.md (tables), results.json (every number) and PNG plots: learning curves,
held-out MSE per dataset, tracking drift vs horizon. With --with-recipe, CleanDiffuser's recipe is
trained on the champion's training episodes and scored on the same held-out episodes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from invdyn.errors import InvdynError

#: CleanDiffuser's recipe (the baseline to beat): FancyMlp h512 dropout 0.1, Adam 3e-4, batch 512, random
#: 80/20 transition split, early stopping with patience 3, last checkpoint kept
RECIPE = {
    "arch": "fancy_mlp",
    "hidden_dim": 512,
    "dropout": 0.1,
    "optimizer": "adam",
    "lr": 3e-4,
    "weight_decay": 0.0,
    "batch_size": 512,
    "max_epochs": 100,
    "min_delta": 0.0,
    "eval_every": None,
    "schedule": "none",
    "loss": "mse",
    "patience": 3,
    "split": "transitions",
    "keep": "last",
    "ema": 0.0,  # the raw weights
    "precision": "fp32",  # CleanDiffuser trains in fp32 (bf16 inputs lose the small s' - s, see bench)
}

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
    ("heldout_mse", "held-out action MSE"),
    ("one_step_error", "one-step state error"),
    ("tracking_drift", "tracking drift at H"),
)
#: the mean-action baseline's value of each metric
BASELINE_OF = {
    "heldout_mse": "baseline_mse",
    "one_step_error": "one_step_baseline",
    "tracking_drift": "tracking_baseline",
}


def subset(transitions, rows: np.ndarray, tag: str):
    """The transitions at `rows` (whole episodes, in order) as a dataset of their own.

    Its sha256 is derived from the parent's and the rows, so a model trained on it never claims the
    parent's data (evaluating it on the parent scores all rows, not a split it cannot know).
    """
    rows = np.asarray(rows)
    digest = hashlib.sha256(
        f"{transitions.sha256}:{tag}:".encode() + rows.astype(np.int64).tobytes()
    ).hexdigest()
    take = (lambda a: None) if transitions.qpos is None else (lambda a: a[rows])
    stats = {
        **transitions.stats,
        "sha256": digest,
        "subset_of": transitions.sha256,
        "subset": tag,
        "transitions": int(len(rows)),
        "episodes": int(len(np.unique(transitions.episode[rows]))),
    }
    return replace(
        transitions,
        obs=transitions.obs[rows],
        act=transitions.act[rows],
        next_obs=transitions.next_obs[rows],
        episode=transitions.episode[rows],
        qpos=take(transitions.qpos),
        qvel=None if transitions.qvel is None else transitions.qvel[rows],
        stats=stats,
    )


def train_recipe(
    transitions, train_rows: np.ndarray, out_dir, *, seed: int = 0, max_epochs: int | None = None, **overrides
):
    """Train CleanDiffuser's recipe (or the recipe with `overrides`) on `train_rows` only; returns TrainResult."""
    from pipeline.training.trainer import TrainConfig, train

    config = {**RECIPE, **overrides, "seed": seed}
    if max_epochs is not None:
        config["max_epochs"] = max_epochs
    return train(subset(transitions, train_rows, "train"), TrainConfig(**config), out_dir)


# ---------------------------------------------------------------- collecting results


def evaluate_record(
    record: dict,
    *,
    with_recipe: bool,
    work_dir: Path,
    horizon: int,
    starts: int,
    samples: int,
    recipe_max_epochs: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one champion (and optionally the recipe on the same split) -> a report entry."""
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.quality.evaluate import evaluate, heldout_rows

    model = invdyn.read_model_dir(record["model_dir"])
    transitions = load_transitions(
        record.get("spec") or record.get("dataset") or model.params["dataset"]["name"]
    )
    rows = heldout_rows(transitions, model.params)
    kw = {
        "horizon": horizon,
        "tracking_starts": starts,
        "one_step_samples": samples,
        "rows": rows,
        "progress": progress,
    }
    entry = {
        "dataset": transitions.name,
        "champion": evaluate(model, transitions, **kw),
        "champion_dir": str(record["model_dir"]),
        "champion_curve": model.params.get("learning_curve") or [],
        "champion_config": record.get("config") or model.params.get("training") or {},
        "recipe": None,
    }
    if with_recipe:
        trained = train_recipe(
            transitions,
            rows[0],
            work_dir / "recipe" / transitions.name,
            max_epochs=recipe_max_epochs,
            threads=threads,
        )
        recipe = invdyn.read_model_dir(trained.model_dir)
        entry.update(
            recipe=evaluate(recipe, transitions, **kw),
            recipe_dir=str(trained.model_dir),
            recipe_curve=recipe.params.get("learning_curve") or [],
        )
    return entry


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


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def verdict(result: dict) -> str:
    """One word a user can scan: is this dataset well served by its model?"""
    mse = _ratio(result.get("heldout_mse"), result.get("baseline_mse"))
    drift = _ratio(result.get("tracking_drift"), result.get("tracking_baseline"))
    if mse is None:
        return "n/a"
    if mse <= WELL_SERVED_MSE and (drift is None or drift <= WELL_SERVED_DRIFT):
        return "well served" + (" (no physics check)" if drift is None else "")
    return "weak"


def markdown(entries: list[dict], horizon: int, failed: list[dict] = ()) -> str:
    has_recipe = any(e.get("recipe") for e in entries)
    lines = [
        "# invdyn quality report",
        "",
        "Every number is measured on held-out episodes the model never trained on. Physics metrics are the "
        "normalized-state RMSE between where MuJoCo goes under the predicted actions and the recorded "
        f"trajectory: one step from the recorded state, and after {horizon} closed-loop steps (tracking drift). "
        "The mean-action baseline applies the training data's mean action; lower is better everywhere.",
        "",
        "## At a glance",
        "",
        "| dataset | held-out MSE / baseline | mean R² | tracking drift / baseline | verdict |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        c = e["champion"]
        r2 = [v for v in c.get("per_dim_r2") or [] if v is not None]
        lines.append(
            f"| {e['dataset']} | {_fmt(_ratio(c['heldout_mse'], c['baseline_mse']), 3)} | "
            f"{_fmt(float(np.mean(r2)) if r2 else None, 3)} | "
            f"{_fmt(_ratio(c.get('tracking_drift'), c.get('tracking_baseline')), 3)} | {verdict(c)} |"
        )
    lines += [
        "",
        f"Well served: held-out MSE below {WELL_SERVED_MSE:g}x and {horizon}-step drift below "
        f"{WELL_SERVED_DRIFT:g}x the mean-action baseline's.",
        "",
        "## Champion vs CleanDiffuser recipe vs mean-action baseline",
        "",
        "| dataset | metric | champion | recipe | baseline | champion / recipe |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        c, r = e["champion"], e.get("recipe") or {}
        for key, label in METRICS:
            label = label.replace("at H", f"at {horizon}")
            lines.append(
                f"| {e['dataset']} | {label} | {_fmt(c.get(key))} | {_fmt(r.get(key))} | "
                f"{_fmt(c.get(BASELINE_OF[key]))} | {_fmt(_ratio(c.get(key), r.get(key)), 3)} |"
            )
    if not has_recipe:
        lines += [
            "",
            "Recipe column empty: run with `--with-recipe` to train and score CleanDiffuser's recipe.",
        ]
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
    lines += [
        "",
        "## Plots",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![held-out MSE per dataset](heldout_mse.png)",
        "",
        "![tracking drift vs horizon](tracking_drift.png)",
        "",
        "## Models",
        "",
        "| dataset | champion | training config |",
        "|---|---|---|",
    ]
    for e in entries:
        config = e.get("champion_config") or {}
        cfg = ", ".join(f"{k}={config[k]}" for k in CONFIG_KEYS if k in config)
        lines.append(f"| {e['dataset']} | `{e['champion_dir']}` | {cfg} |")
    return "\n".join(lines) + "\n"


def curve_values(curve) -> tuple[list, list]:
    """(x, validation loss) from a params.json learning curve (a list of dicts with epoch/step and val loss)."""
    xs, ys = [], []
    for i, point in enumerate(curve or []):
        if isinstance(point, dict):
            y = next((point[k] for k in ("val_mse", "val_loss", "val") if point.get(k) is not None), None)
            x = point.get("epoch", point.get("step", i + 1))
        else:
            x, y = i + 1, point
        if isinstance(y, (int, float)):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(3, max(1, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_learning_curves(entries: list[dict], path: Path) -> None:
    fig, axes = _grid(len(entries))
    for ax, e in zip(axes, entries, strict=False):
        for key, label, style in (
            ("champion_curve", "champion", "-"),
            ("recipe_curve", "recipe (val: random transitions)", "--"),
        ):
            xs, ys = curve_values(e.get(key))
            if ys:
                ax.plot(xs, ys, style, label=label)
        ax.set(title=e["dataset"], xlabel="epoch", ylabel="validation MSE", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_heldout_mse(entries: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [e["dataset"] for e in entries]
    x = np.arange(len(names))
    series = [
        ("champion", [e["champion"]["heldout_mse"] for e in entries]),
        ("recipe", [(e.get("recipe") or {}).get("heldout_mse") for e in entries]),
        ("mean action", [e["champion"]["baseline_mse"] for e in entries]),
    ]
    series = [(label, vals) for label, vals in series if any(v is not None for v in vals)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 2), 3.8))
    for k, (label, vals) in enumerate(series):
        ax.bar(
            x + (k - (len(series) - 1) / 2) * width,
            [np.nan if v is None else v for v in vals],
            width,
            label=label,
        )
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="held-out action MSE", yscale="log", title="held-out action MSE per dataset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_tracking_drift(entries: list[dict], path: Path) -> None:
    fig, axes = _grid(len(entries))
    for ax, e in zip(axes, entries, strict=False):
        c, r = e["champion"], e.get("recipe") or {}
        for values, label, style in (
            (c.get("drift_per_step"), "champion", "-"),
            (r.get("drift_per_step"), "recipe", "--"),
            (c.get("baseline_drift_per_step"), "mean action", ":"),
        ):
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, style, label=label)
        if not c.get("drift_per_step"):
            ax.text(
                0.5,
                0.5,
                "no physics:\n" + str(c.get("physics_reason"))[:80],
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=7,
                wrap=True,
            )
        ax.set(title=e["dataset"], xlabel="closed-loop step", ylabel="state RMSE (normalized)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(entries: list[dict], out_dir, horizon: int = 32, failed: list[dict] = ()) -> Path:
    """Write report.md, results.json and the three PNGs into `out_dir` (each file atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from invdyn._files import atomic_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, plot in (
        ("learning_curves.png", plot_learning_curves),
        ("heldout_mse.png", plot_heldout_mse),
        ("tracking_drift.png", plot_tracking_drift),
    ):
        plot(entries, out_dir / f".{name}.tmp.png")
        plt.close("all")
        (out_dir / f".{name}.tmp.png").replace(out_dir / name)
    with atomic_file(out_dir / "results.json", "w") as f:
        json.dump(entries, f, indent=2, sort_keys=True, default=str)
    with atomic_file(out_dir / "report.md", "w") as f:
        f.write(markdown(entries, horizon, failed))
    return out_dir / "report.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--summary", help="summary.json written by pipeline.job.pretrain_all")
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
    ap.add_argument("--horizon", type=int, default=32)
    ap.add_argument("--starts", type=int, default=128, help="tracking start points per dataset")
    ap.add_argument("--samples", type=int, default=2000, help="one-step transitions per dataset")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm

    try:
        records = (
            read_summary(args.summary) if args.summary else [{"model_dir": Path(m)} for m in args.models]
        )
        failed = [rec for rec in records if rec.get("status") == "failed"]
        entries = [
            evaluate_record(
                rec,
                with_recipe=args.with_recipe,
                work_dir=Path(args.out),
                horizon=args.horizon,
                starts=args.starts,
                samples=args.samples,
                recipe_max_epochs=args.recipe_max_epochs,
                threads=args.threads,
            )
            for rec in tqdm([r for r in records if r not in failed], desc="report", unit="dataset")
        ]
        path = write_report(entries, args.out, args.horizon, failed=failed)
    except (InvdynError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
