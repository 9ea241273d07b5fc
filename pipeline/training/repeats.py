"""Repeats over split seeds: retrain on several train / validation / test splits and give each metric as
mean ± std (plus min and max) over the splits. `pipeline.train --split-seeds`, the quality report and the
benches all summarize with these functions, so an interval means the same thing everywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.training.config import TrainConfig, TrainConfigError

#: the params.json metrics a repeat summarizes (test first: the figures no choice read)
REPEAT_METRICS = (
    "test_mse",
    "test_mse_normalized",
    "test_r2",
    "test_baseline_mse",
    "heldout_mse",
    "heldout_mse_normalized",
    "baseline_mse",
    "best_epoch",
    "train_time_s",
)
SPLITS_JSON = "splits.json"
SPLITS_MD = "splits.md"


def parse_seeds(text: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]: distinct integers >= 0 in the order given; anything else is refused."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit():
            raise TrainConfigError(
                f"--split-seeds takes integers >= 0 separated by commas (0,1,2), got {text!r}"
            )
        if int(part) in seeds:
            raise TrainConfigError(f"--split-seeds {text!r} names split seed {part} twice")
        seeds.append(int(part))
    return seeds


def interval(values) -> dict:
    """{"mean", "std", "min", "max", "n"} of the finite `values` (std: sample std, ddof 1; 0 for one value;
    all None when none is finite)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    arr = np.asarray(xs, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": len(xs),
    }


def summarize(runs: list[dict], keys=REPEAT_METRICS) -> dict:
    """{key: interval over runs} for every key some run (a dict of numbers) has."""
    return {k: interval(r.get(k) for r in runs) for k in keys if any(k in r for r in runs)}


def fmt_interval(s: dict | None, spec: str = ".4g") -> str:
    """ "mean ± std" (one run: the value alone), "-" when nothing was measured."""
    if not s or s.get("mean") is None:
        return "-"
    if s.get("n", 0) < 2:
        return format(s["mean"], spec)
    return f"{format(s['mean'], spec)} ± {format(s['std'], '.2g')}"


def fmt_range(s: dict | None, spec: str = ".4g") -> str:
    """ "min - max" of an interval, "-" when nothing was measured."""
    if not s or s.get("mean") is None:
        return "-"
    return f"{format(s['min'], spec)} - {format(s['max'], spec)}"


def train_split_seeds(transitions, config: TrainConfig, out, seeds, *, on_eval=None, dataset_name=None):
    """Train `config` once per split seed into OUT/split-<seed>/ (the same init seed each time), then write
    OUT/splits.json and OUT/splits.md; returns (the summary dict, the TrainResults)."""
    from dataclasses import replace

    from pipeline.training.trainer import train

    out = Path(out)
    results = []
    for seed in seeds:
        run_config = replace(config, split_seed=int(seed))
        results.append(
            train(transitions, run_config, out / f"split-{seed}", on_eval=on_eval, dataset_name=dataset_name)
        )
    summary = {
        "dataset": dataset_name or transitions.name,
        "split_seeds": [int(s) for s in seeds],
        "config": {k: v for k, v in config.to_dict().items() if k != "split_seed"},
        "runs": [
            {"split_seed": int(s), "model_dir": f"split-{s}", **{k: r.metrics.get(k) for k in REPEAT_METRICS}}
            for s, r in zip(seeds, results, strict=True)
        ],
    }
    summary["summary"] = summarize(summary["runs"])
    out.mkdir(parents=True, exist_ok=True)
    (out / SPLITS_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / SPLITS_MD).write_text(splits_table(summary))
    return summary, results


def splits_table(summary: dict) -> str:
    """The Markdown table of a `train_split_seeds` summary: one row per metric, mean ± std, min - max."""
    seeds = ",".join(str(s) for s in summary["split_seeds"])
    lines = [
        f"# {summary['dataset']}: {len(summary['split_seeds'])} split seeds ({seeds})",
        "",
        "Each run retrains the same config on another train / validation / test split of the episodes. "
        "`test_*`: test episodes (no choice read them); `heldout_*`: validation episodes. mean ± sample std "
        "over the splits.",
        "",
        "| metric | mean ± std | min - max | n |",
        "|---|---|---|---|",
    ]
    for key, s in summary["summary"].items():
        lines.append(f"| {key} | {fmt_interval(s)} | {fmt_range(s)} | {s['n']} |")
    return "\n".join(lines) + "\n"
