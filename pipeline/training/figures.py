"""The model card's figures as PNG bytes (invdyn.model_dir.FIGURES): the learning curve, the held-out R² of
each action dimension, and the closed-loop return against plan noise. Small on purpose (a few tens of KB):
they travel in every bundle."""

from __future__ import annotations

import io
import math

from invdyn.model_dir import FIGURES

CURVE_FILE, R2_FILE, CLOSED_LOOP_FILE = FIGURES  # the order of invdyn.model_dir.FIGURES
_DPI = 80
_SIZE = (5.0, 3.0)  # inches: 400 x 240 pixels at _DPI


def _figure():
    # Figure + the Agg canvas, not pyplot: no global state, no GUI backend, safe beside other threads
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def learning_curve_png(curve: list[dict], title: str = "") -> bytes | None:
    """Validation MSE and training loss over the training steps (log scale), the kept step marked; None
    when the curve has no point to draw."""
    points = [r for r in curve or [] if isinstance(r, dict) and _finite(r.get("step"))]
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for key, label, style in (("train_loss", "train loss", "--"), ("val_mse", "val_mse (held out)", "-")):
        xy = [(r["step"], r[key]) for r in points if _finite(r.get(key)) and r[key] > 0]
        if xy:
            ax.plot(*zip(*xy, strict=True), style, marker="." if len(xy) < 40 else None, label=label)
    val = [r for r in points if _finite(r.get("val_mse")) and r["val_mse"] > 0]
    if val:
        best = min(val, key=lambda r: r["val_mse"])
        ax.plot([best["step"]], [best["val_mse"]], "o", mfc="none", color="black", label="best")
    last = points[-1]
    epochs = last.get("epoch")
    ax.set(xlabel=f"step ({epochs} epochs)" if _finite(epochs) else "step", ylabel="MSE", yscale="log")
    ax.set_title(title or "learning curve", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def r2_png(per_dim_r2, title: str = "") -> bytes | None:
    """One bar per action dimension: R² on the held-out rows (1 = perfect, 0 = the mean action); None
    when there is no value."""
    values = list(per_dim_r2 or [])
    if not any(_finite(v) for v in values):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    xs = range(len(values))
    heights = [v if _finite(v) else 0.0 for v in values]
    ax.bar(xs, heights, color=["tab:blue" if _finite(v) else "lightgray" for v in values])
    for x, v in zip(xs, values, strict=True):
        text = f"{v:.3f}" if _finite(v) else "n/a"
        ax.annotate(text, (x, max(heights[x], 0.0)), ha="center", va="bottom", fontsize=7)
    low = min(0.0, *heights)
    ax.set_ylim(low - 0.05 * (1 - low), 1.08)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xticks(list(xs), [f"a{i}" for i in xs], fontsize=8)
    ax.set(xlabel="action dimension", ylabel="R² (held out)")
    ax.set_title(title or "held-out R² per action dimension", fontsize=9)
    return _png(fig)


def closed_loop_png(rows: list[dict], title: str = "", others: dict[str, list[dict]] | None = None):
    """D4RL-normalized return against plan noise σ: the model (95 % interval bars), the actor acting itself
    and the mean action, per planner; `others` adds more models' rows (e.g. {"recipe": rows}). None
    without rows."""
    rows = [r for r in rows or [] if _finite(r.get("normalized_return"))]
    if not rows:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, planner in enumerate(dict.fromkeys(r["planner"] for r in rows)):
        mine = sorted((r for r in rows if r["planner"] == planner), key=lambda r: r["plan_noise"])
        xs = [r["plan_noise"] for r in mine]
        ys = [r["normalized_return"] for r in mine]
        ci = [r.get("normalized_return_ci95") or [y, y] for r, y in zip(mine, ys, strict=True)]
        err = [
            [y - c[0] for y, c in zip(ys, ci, strict=True)],
            [c[1] - y for y, c in zip(ys, ci, strict=True)],
        ]
        color = f"C{i}"
        ax.errorbar(xs, ys, yerr=err, marker="o", color=color, capsize=3, label=f"model ({planner} plans)")
        ax.axhline(mine[0]["actor_normalized_return"], color=color, ls="--", lw=1, label=f"{planner} actor")
        for j, (label, theirs) in enumerate((others or {}).items()):
            pts = sorted((r for r in theirs if r["planner"] == planner), key=lambda r: r["plan_noise"])
            if pts:
                ax.plot(
                    [r["plan_noise"] for r in pts],
                    [r["normalized_return"] for r in pts],
                    marker="s",
                    ls=":",
                    color=f"C{i + 3 + j}",
                    label=f"{label} ({planner} plans)",
                )
    ax.axhline(rows[0]["baseline_normalized_return"], color="gray", ls=":", lw=1, label="mean action")
    ax.set(xlabel="plan noise σ (dataset stds)", ylabel="D4RL-normalized return")
    ax.set_title(title or "closed-loop return", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def card_figures(
    curve: list[dict] | None = None, per_dim_r2=None, name: str = "", closed_loop=None
) -> dict[str, bytes]:
    """{file name: PNG bytes} of the figures there is data for (titled with the model's `name`); {} where
    matplotlib is not installed (the card then links none)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    prefix = f"{name}: " if name else ""
    drawn = {CURVE_FILE: learning_curve_png(curve, prefix + "learning curve") if curve is not None else None}
    drawn[R2_FILE] = r2_png(per_dim_r2, prefix + "held-out R²") if per_dim_r2 is not None else None
    drawn[CLOSED_LOOP_FILE] = closed_loop_png(closed_loop, prefix + "closed loop") if closed_loop else None
    return {name: png for name, png in drawn.items() if png}
