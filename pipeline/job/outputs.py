"""What a job leaves in its output directory, and the ledger that makes `--resume` skip finished trials.

DIR/summary.json          one record per dataset (the contract): dataset, heldout_mse, baseline_mse,
                          config, model_dir, epochs, wall_s, trial_id, selected_by, evaluation (headline
                          metrics of the selected model), candidates (the trials evaluated, with their
                          metrics), champion_metric, ... or status "failed" + error
DIR/summary.md            the same as a table (also printed)
DIR/job.json              the job: name, datasets, placement, timing (wall, time in training steps)
DIR/models/<dataset>/     the best model directory of each dataset (invdyn format)
DIR/curves/<dataset>.json every trial's learning curve (+ .png plot)
DIR/trials/<key>.json     ledger: one file per finished trial, written by the driver as it finishes
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

from invdyn._files import atomic_file

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
JOB_JSON = "job.json"


def safe_name(dataset: str) -> str:
    """A folder name for a dataset spec (Minari ids and paths hold '/' and ':')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"


def write_json_atomic(path: Path, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


# ------------------------------------------------------------------------------------------- ledger


class Ledger:
    """Finished trials by stable key, one JSON file each (atomic), so a SIGKILLed driver loses none."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "trials"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def done(self) -> dict[str, dict]:
        found = {}
        for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                entry = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # never trust a damaged entry: that trial simply runs again
            if entry.get("status") == "finished" and entry.get("checkpoint_path"):
                found[p.stem] = entry
        return found

    def record(self, key: str, entry: dict) -> None:
        write_json_atomic(self.path(key), entry)

    def clear(self) -> int:
        n = 0
        for p in self.dir.glob("*.json") if self.dir.is_dir() else []:
            p.unlink()
            n += 1
        return n


# ------------------------------------------------------------------------------------------ summary


def best_entry(entries: list[dict]) -> dict | None:
    """The finished trial with the lowest held-out MSE (ties: the first by key, for a stable choice)."""
    scored = [e for e in entries if _finite(e.get("heldout_mse")) is not None]
    return min(scored, key=lambda e: (e["heldout_mse"], e["key"])) if scored else None


def _finite(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def write_curves(out_dir: Path, dataset: str, entries: list[dict]) -> Path:
    """Every trial's learning curve of one dataset as JSON, plus a PNG of held-out MSE per epoch."""
    curves = {
        e["key"]: {"trial_id": e.get("trial_id"), "config": e.get("config"), "curve": e.get("curve") or []}
        for e in entries
    }
    path = Path(out_dir) / "curves" / f"{safe_name(dataset)}.json"
    write_json_atomic(path, curves)
    with contextlib.suppress(Exception):  # a plot is a convenience; the JSON above is the record
        _plot(path.with_suffix(".png"), dataset, entries)
    return path


def _plot(path: Path, dataset: str, entries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        pts = [
            (p.get("epoch"), p.get("val_mse")) for p in e.get("curve") or [] if p.get("val_mse") is not None
        ]
        if pts:
            cfg = e.get("config") or {}
            ax.plot(*zip(*pts, strict=True), label=f"h{cfg.get('hidden_dim')} d{cfg.get('dropout')}")
    ax.set(xlabel="epoch", ylabel="held-out MSE", yscale="log", title=dataset)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def write_summary(out_dir: Path, records: list[dict]) -> str:
    """DIR/summary.json + DIR/summary.md; returns the Markdown table."""
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / SUMMARY_JSON, records)
    table = format_table(records)
    with atomic_file(out_dir / SUMMARY_MD, "w") as f:
        f.write(f"# invdyn pretraining summary\n\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{table}\n")
    return table


def _fmt(v, spec=".4g") -> str:
    f = _finite(v)
    return "-" if f is None else format(f, spec)


def format_table(records: list[dict]) -> str:
    head = (
        "| dataset | status | held-out MSE | baseline MSE | one-step error | tracking drift | selected by | "
        "best config | epochs | trials | wall s | champion |"
    )
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        cfg = r.get("config") or {}
        best = ", ".join(f"{k}={cfg[k]}" for k in ("arch", "hidden_dim", "dropout", "lr") if k in cfg)
        reg = r.get("registration") or {}
        champion = "yes" if reg.get("champion") else (reg.get("reason") or "-")[:60] if reg else "-"
        status = r.get("status", "")
        if status == "failed":
            status = f"failed: {str(r.get('error', ''))[:80]}"
        ev = r.get("evaluation") or {}
        drift = _fmt(ev.get("tracking_drift")) + (
            f" @{ev['horizon']}" if _finite(ev.get("tracking_drift")) else ""
        )
        rows.append(
            f"| {r['dataset']} | {status} | {_fmt(r.get('heldout_mse'))} | {_fmt(r.get('baseline_mse'))} | "
            f"{_fmt(ev.get('one_step_error'))} | {drift} | {r.get('selected_by') or '-'} | {best or '-'} | {r.get('epochs', '-')} | {r.get('trials_finished', 0)}/{r.get('trials', 0)} | "
            f"{_fmt(r.get('wall_s'), '.0f')} | {champion} |"
        )
    return "\n".join(rows)
