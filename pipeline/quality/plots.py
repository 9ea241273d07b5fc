"""The report's PNG plots: learning curves, held-out MSE per dataset, tracking drift vs horizon."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: (file, title in report.md, how it is drawn); filled in below the functions
PLOTS: tuple = ()


def curve_values(curve) -> tuple[list, list]:
    """(x, validation loss) of a params.json learning curve (dicts with epoch/step and a val loss)."""
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
    ax.set(ylabel="action MSE (test episodes)", yscale="log", title="action MSE per dataset, test episodes")
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


PLOTS = (
    ("learning_curves.png", "learning curves", plot_learning_curves),
    ("heldout_mse.png", "held-out MSE per dataset", plot_heldout_mse),
    ("tracking_drift.png", "tracking drift vs horizon", plot_tracking_drift),
)


def write_plots(entries: list[dict], out_dir: Path) -> None:
    """Every plot of PLOTS into `out_dir`, each written to a temporary name and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, _, plot in PLOTS:
        tmp = out_dir / f".{name}.tmp.png"
        plot(entries, tmp)
        plt.close("all")
        tmp.replace(out_dir / name)
