"""`pretrain_all --split-seeds 0,1,2`: the job once per split seed, each repeat in DIR/split-<s>/ (its own
ledger, summary.json, models/, curves/, job.json), and what sums the repeats up: DIR/job.json, splits.json and
splits.md (mean ± std, min - max over the splits; pipeline.training.repeats computes every interval).

Only the first seed's repeat is registered and exported: a dataset keeps one champion, and the other
repeats exist to say how much its figures move with the split. Without --split-seeds the job has one
repeat, DIR itself, laid out as it always was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from invdyn._files import atomic_file, write_json
from pipeline.job.config import JobConfigError
from pipeline.job.outputs import JOB_JSON, SUMMARY_JSON, Ledger, write_job
from pipeline.training.config import TrainConfig
from pipeline.training.repeats import fmt_interval, fmt_range, summarize

SPLITS_JSON = "splits.json"
SPLITS_MD = "splits.md"
#: the summary.json fields splits.json summarizes over the repeats (test first: no choice read them)
SPLIT_METRICS = (
    "test_mse",
    "test_mse_normalized",
    "test_r2",
    "test_baseline_mse",
    "heldout_mse",
    "baseline_mse",
    "epochs",
    "train_time_s",
)


@dataclass
class Repeat:
    """One run of the job's whole trial grid on one split."""

    split_seed: int | None  # None: no --split-seeds (the usual split, the trials' own seed)
    out: Path  # DIR/split-<s>/, or DIR itself without --split-seeds
    records: list = field(default_factory=list)  # its DatasetRecords (summary.json)
    record: dict = field(default_factory=dict)  # its job.json

    @property
    def label(self) -> str:
        """What the job's lines of this repeat start with."""
        return "" if self.split_seed is None else f"split seed {self.split_seed}: "

    @property
    def tune_suffix(self) -> str:
        return "" if self.split_seed is None else f"-split{self.split_seed}"

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """Every trial of the repeat cuts its episodes with the repeat's seed (a searched seed included)."""
        return base if self.split_seed is None else dataclasses.replace(base, split_seed=self.split_seed)


@dataclass(frozen=True)
class Stage:
    """What every repeat of a job shares: its state, datasets, search points and MLflow tracking."""

    state: dict
    specs: list[str]
    ready: dict
    failed: list
    points: list[dict]
    space: dict
    uri: str | None
    logger: object | None


def plan(out: Path, seeds: list[int] | None, space: dict) -> list[Repeat]:
    """The repeats of a job: one per split seed, in the order given (the first is registered)."""
    if seeds is None:
        return [Repeat(None, out)]
    if "split_seed" in space:
        raise JobConfigError(
            "--split-seeds sets each repeat's split_seed, so the search space cannot vary it: drop "
            "split_seed from --search-space (or drop --split-seeds)"
        )
    return [Repeat(s, out / f"split-{s}") for s in seeds]


def start_over(repeats: list[Repeat], resume: bool) -> None:
    """Without --resume every repeat's ledger starts empty (a plain job's is cleared by outputs.job_state)."""
    if resume or repeats[0].split_seed is None:
        return
    cleared = sum(Ledger(r.out).clear() for r in repeats)
    if cleared:
        print(f"starting over: {cleared} finished trial(s) of an earlier job ignored (use --resume)")
    stale = repeats[0].out.parent / SUMMARY_JSON
    if stale.is_file():  # left there by a job without --split-seeds; this job's are in split-<s>/
        print(f"note: {stale} is an earlier job's; this job's summaries are DIR/split-<s>/{SUMMARY_JSON}")


def describe(repeats: list[Repeat]) -> dict:
    """DIR/job.json's fields about the repeats (none without --split-seeds)."""
    if repeats[0].split_seed is None:
        return {}
    first = repeats[0]
    return {
        "split_seeds": [r.split_seed for r in repeats],
        # one champion per dataset: the first split seed's model; the others are measured, never registered
        "registered_split_seed": first.split_seed,
        "registered_dir": first.out.name,
        "repeats": [{"split_seed": r.split_seed, "dir": r.out.name} for r in repeats],
    }


def registered_note(repeats: list[Repeat], registered: bool, exported: bool) -> str | None:
    """The job's line saying which repeat becomes the registry's (None without --split-seeds)."""
    if repeats[0].split_seed is None:
        return None
    first = repeats[0]
    seeds = ",".join(str(r.split_seed) for r in repeats)
    over = f"mean ± std over the splits: {SPLITS_MD}"
    if not registered:
        return (
            f"split seeds {seeds}: nothing registered (--no-register / --no-mlflow); the registry's model of "
            f"each dataset is split seed {first.split_seed}'s: `python -m pipeline.register --from-storage "
            f"{first.out}` ({over})"
        )
    kept = "registered and exported" if exported else "registered"
    return (
        f"split seeds {seeds}: only split seed {first.split_seed}'s models ({first.out}) are {kept}; the "
        f"other splits are measured, never registered ({over})"
    )


def finish(out: Path, state: dict, specs: list[str], repeats: list[Repeat]) -> str:
    """DIR/job.json (the job and each repeat's last run), DIR/splits.json and splits.md; returns the table."""
    described = describe(repeats)
    for entry, rep in zip(described["repeats"], repeats, strict=True):
        entry["summary"] = f"{rep.out.name}/{SUMMARY_JSON}"
        entry["job"] = f"{rep.out.name}/{JOB_JSON}"
        entry["last_run"] = rep.record.get("last_run")
    write_job(
        out, {**state, "datasets": specs, **described, "mlflow_uri": repeats[0].record.get("mlflow_uri")}
    )
    splits = splits_summary(repeats)
    write_json(out / SPLITS_JSON, splits)
    table = splits_table(splits)
    with atomic_file(out / SPLITS_MD, "w") as f:
        f.write(f"# invdyn pretraining over split seeds\n\n{table}\n")
    return table


def splits_summary(repeats: list[Repeat]) -> dict:
    """Per dataset: each repeat's figures and their interval over the repeats that finished it."""
    datasets: dict[str, dict] = {}
    for rep in repeats:
        for rec in rep.records:
            line = rec.to_json()
            run = {"split_seed": rep.split_seed, "status": line.get("status"), "dir": rep.out.name}
            run.update({k: line[k] for k in ("model_dir", "error", *SPLIT_METRICS) if k in line})
            datasets.setdefault(rec.dataset, {"runs": []})["runs"].append(run)
    for d in datasets.values():
        d["summary"] = summarize([r for r in d["runs"] if r["status"] == "ok"], SPLIT_METRICS)
    return {
        "split_seeds": [r.split_seed for r in repeats],
        "registered_split_seed": repeats[0].split_seed,
        "datasets": datasets,
    }


def splits_table(splits: dict) -> str:
    """The Markdown table of splits.json: per dataset, test and held-out figures over the split seeds."""
    head = (
        "| dataset | split seeds | n | test MSE | test MSE min - max | test R² | held-out MSE | baseline MSE "
        "(test) |"
    )
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, d in splits["datasets"].items():
        s = d["summary"]
        seeds = ",".join(str(r["split_seed"]) for r in d["runs"] if r["status"] == "ok")
        n = (s.get("test_mse") or s.get("heldout_mse") or {}).get("n", 0)
        cells = [
            name,
            seeds or "-",
            n,
            fmt_interval(s.get("test_mse")),
            fmt_range(s.get("test_mse")),
            fmt_interval(s.get("test_r2"), ".3f"),
            fmt_interval(s.get("heldout_mse")),
            fmt_interval(s.get("test_baseline_mse")),
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    note = (
        f"Registered and exported: split seed {splits['registered_split_seed']}'s models only. Test "
        "figures are on each split's test episodes (no choice read them); held-out is the validation part. "
        "mean ± sample std over the splits."
    )
    return "\n".join([*rows, "", note])
