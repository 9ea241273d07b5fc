"""What a job leaves in its output directory, and the ledger that makes `--resume` skip finished trials.

DIR/summary.json          one record per dataset (the contract): dataset, heldout_mse (validation part),
                          test_mse / test_r2 / ... (test part, when the split has one), baseline_mse,
                          config, model_dir, epochs, wall_s, trial_id, selected_by, evaluation (headline
                          metrics of the selected model), candidates (the trials evaluated, with their
                          metrics; a population's: every search point), population (K members),
                          champion_metric, ... or status "failed" + error
DIR/summary.md            the same as a table (also printed)
DIR/job.json              the job: name, datasets, placement (gpus: a trial's GPU fraction), population,
                          timing (wall, time in training steps)
DIR/models/<name>/        the selected model directory of each dataset (invdyn format)
DIR/curves/<name>.json    every trial's learning curve (+ .png plot)
DIR/trials/<key>.json     ledger: one file per finished trial, written by the driver as it finishes; a
                          population trial writes one per shape group, holding its members' entries

With --split-seeds S,S each split seed's run writes all of the above into DIR/split-<s>/ instead
(pipeline.job.split_repeats); DIR/job.json then names the repeats and the registered one, and DIR/splits.json
/ splits.md give each dataset's figures per split and mean ± std, min - max over the splits.

<name> is the dataset's model name (invdyn.settings.dataset_model_name), as in the cache and the registry.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path

from invdyn._files import atomic_file, write_json
from invdyn.settings import dataset_model_name
from pipeline.job.records import DatasetRecord, TrialResult
from pipeline.quality.metrics import finite, fmt_number

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
JOB_JSON = "job.json"


# ------------------------------------------------------------------------------------------- ledger


class Ledger:
    """Finished trials by stable key, one JSON file each (atomic), so a SIGKILLed driver loses none. A
    population's shape group is one file whose "members" are the entries of the trials it trained."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "trials"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def done(self) -> dict[str, TrialResult]:
        found = {}
        for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                entry = json.loads(p.read_text())
                members = entry.get("members")
                for e in members if isinstance(members, list) else [entry]:
                    if e.get("status") == "finished" and e.get("checkpoint_path"):
                        found[e["key"] if members else p.stem] = TrialResult.from_json(e)
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # never trust a damaged entry: that trial simply runs again
        return found

    def record(self, entry: TrialResult) -> None:
        write_json(self.path(entry.key), entry.to_json())

    def record_group(self, key: str, head: dict, members: list[TrialResult]) -> None:
        """A population's shape group: `head` (dataset, trial id, times) and its members' entries."""
        entry = {**head, "key": key, "status": "finished", "members": [m.to_json() for m in members]}
        write_json(self.path(key), entry)

    def clear(self) -> int:
        n = 0
        for p in self.dir.glob("*.json") if self.dir.is_dir() else []:
            p.unlink()
            n += 1
        return n


def job_state(out_dir: Path, resume: bool) -> dict:
    """The job's name (stable across --resume: MLflow groups its runs by it) and its previous state; a
    job that does not resume starts its ledger over."""
    path = Path(out_dir) / JOB_JSON
    if resume and path.is_file():
        state = json.loads(path.read_text())
        state["runs"] = state.get("runs", 0) + 1
        return state
    if not resume:
        cleared = Ledger(out_dir).clear()
        if cleared:
            print(
                f"starting over: {cleared} finished trial(s) of an earlier job in {out_dir} ignored "
                "(use --resume)"
            )
    return {"job": f"invdyn-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}", "runs": 1}


def write_job(out_dir: Path, state: dict) -> None:
    write_json(Path(out_dir) / JOB_JSON, state)


# ------------------------------------------------------------------------------------------ summary


def write_curves(out_dir: Path, dataset: str, entries: list[TrialResult]) -> Path:
    """Every trial's learning curve of one dataset as JSON, plus a PNG of held-out MSE per epoch."""
    curves = {e.key: {"trial_id": e.trial_id, "config": e.config, "curve": e.curve or []} for e in entries}
    path = Path(out_dir) / "curves" / f"{dataset_model_name(dataset)}.json"
    write_json(path, curves)
    with contextlib.suppress(Exception):  # a plot is a convenience; the JSON above is the record
        _plot(path.with_suffix(".png"), dataset, entries)
    return path


def _plot(path: Path, dataset: str, entries: list[TrialResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        pts = [(p.get("epoch"), p.get("val_mse")) for p in e.curve or [] if p.get("val_mse") is not None]
        if pts:
            cfg = e.config or {}
            ax.plot(*zip(*pts, strict=True), label=f"h{cfg.get('hidden_dim')} d{cfg.get('dropout')}")
    ax.set(xlabel="epoch", ylabel="held-out MSE", yscale="log", title=dataset)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def write_summary(out_dir: Path, records: list[DatasetRecord]) -> str:
    """DIR/summary.json + DIR/summary.md; returns the Markdown table."""
    out_dir = Path(out_dir)
    lines = [r.to_json() for r in records]
    write_json(out_dir / SUMMARY_JSON, lines)
    table = format_table(lines)
    with atomic_file(out_dir / SUMMARY_MD, "w") as f:
        f.write(f"# invdyn pretraining summary\n\n{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{table}\n")
    return table


def _num(value, spec: str = ".4g") -> str:
    return fmt_number(value, spec, missing="-")


def format_table(records: list[dict]) -> str:
    """The Markdown table of summary.json's records; the test part's MSE and R² lead where the models have
    them (their split held test episodes out), else the held-out (validation) MSE does."""
    tested = any(finite(r.get("test_mse")) is not None for r in records)
    head = (
        ("| dataset | status | test MSE | test R² " if tested else "| dataset | status ")
        + "| held-out MSE | baseline MSE | one-step error | tracking drift | selected by | best config "
        + "| epochs | trials | wall s | champion |"
    )
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        status = r.get("status", "")
        if status == "failed":
            status = f"failed: {str(r.get('error', ''))[:80]}"
        tests = [_num(r.get("test_mse")), _num(r.get("test_r2"), ".3f")] if tested else []
        cells = [r["dataset"], status, *tests, *_row_cells(r)]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows + closed_loop_table(records))


def closed_loop_table(records: list[dict]) -> list[str]:
    """The selected models' closed-loop rows (oracle plans executed through them, test seeds), if any."""
    from pipeline.quality.closed_loop import format_rows

    lines = []
    for r in records:
        rows = (r.get("evaluation") or {}).get("closed_loop") or []
        lines += format_rows(rows, r["dataset"])[(2 if lines else 0) :]
    if not lines:
        return []
    note = (
        "Closed loop: an oracle planner's plans (the committed agent's next state from the true state, plus "
        "σ · dataset std noise) executed through each model; ratio = its mean raw return / the actor's."
    )
    return ["", note, "", *lines]


def _row_cells(r: dict) -> list:
    """A record's cells from held-out MSE on."""
    cfg = r.get("config") or {}
    best = ", ".join(f"{k}={cfg[k]}" for k in ("arch", "hidden_dim", "dropout", "lr") if k in cfg)
    reg = r.get("registration") or {}
    champion = "yes" if reg.get("champion") else (reg.get("reason") or "-")[:60] if reg else "-"
    ev = r.get("evaluation") or {}
    drift = _num(ev.get("tracking_drift"))
    if finite(ev.get("tracking_drift")) is not None:
        drift += f" @{ev['horizon']}"
    trials = f"{r.get('trials_finished', 0)}/{r.get('trials', 0)}"
    if r.get("population"):
        trials += f" (population of {r['population']})"
    return [
        _num(r.get("heldout_mse")),
        _num(r.get("baseline_mse")),
        _num(ev.get("one_step_error")),
        drift,
        r.get("selected_by") or "-",
        best or "-",
        r.get("epochs", "-"),
        trials,
        _num(r.get("wall_s"), ".0f"),
        champion,
    ]
