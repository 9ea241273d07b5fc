"""Wall time of `pipeline.pretrain_all` and the share of it not spent in training steps.

    python bench/pipeline_overhead.py [--datasets sim] [--max-epochs 15] [--modes train,tune,sequential]
                                      [--out bench-out] [--json results.json]

Modes (same datasets, same --search grid, same epochs, same seeds):
  train       pretrain_all --executor train: each trial a Ray Train TorchTrainer (the default)
  tune        pretrain_all --executor tune: the Tune trial trains in its own (reused) process
  sequential  the same trainings one after another in this process, with all CPUs as torch threads
              (--sequential-threads 1: as one pipeline trial gets; on a busy machine 2 threads thrash)

overhead share = 1 - (sum of the trials' time inside training steps) / (Tune's wall time x trials at once);
for `sequential` the denominator is its wall time. overhead s/trial = the slot-seconds not spent in training
steps, per trial: what a longer training would amortize. Datasets are prepared (simulated + cached) first and not
timed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_pipeline(executor: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.pretrain_all", "--datasets", args.datasets, "--search",
           "--max-epochs", str(args.max_epochs), "--executor", executor, "--out", str(out), "--no-mlflow",
           "--verbose", "0"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    job = json.loads((out / "job.json").read_text())
    last = job["last_run"]
    records = json.loads((out / "summary.json").read_text())
    return {
        "mode": executor,
        "wall_s": wall,
        "tune_wall_s": last["tune_wall_s"],
        "train_time_s": last["train_time_s"],
        "trials": last["ran"],
        "slots": job["placement"]["max_concurrent"],
        "overhead_share": last["overhead_share"],
        "best": {r["dataset"]: r.get("heldout_mse") for r in records},
    }


def run_sequential(args, out: Path) -> dict:
    from pipeline import search
    from pipeline.catalog import resolve_datasets
    from pipeline.datasets import load_transitions
    from pipeline.trainer import TrainConfig, available_cpus, train

    points = search.grid_points(search.DEFAULT_GRID)
    t0 = time.time()
    train_s, n, best = 0.0, 0, {}
    for spec in resolve_datasets(args.datasets):
        t = load_transitions(spec)
        for i, point in enumerate(points):
            threads = args.sequential_threads or available_cpus()
            cfg = TrainConfig(**point, max_epochs=args.max_epochs, seed=0, threads=threads, device="cpu")
            r = train(t, cfg, out / t.name / str(i), dataset_name=t.name)
            train_s += r.metrics["train_time_s"]
            n += 1
            best[t.name] = min(best.get(t.name, float("inf")), r.metrics["heldout_mse"])
    wall = time.time() - t0
    return {"mode": "sequential", "wall_s": wall, "tune_wall_s": wall, "train_time_s": train_s, "trials": n, "slots": 1,
            "overhead_share": 1 - train_s / wall, "best": best}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="sim")
    ap.add_argument("--max-epochs", type=int, default=15)
    ap.add_argument("--modes", default="train,tune,sequential")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--sequential-threads", type=int, help="torch threads of `sequential` (default: all CPUs)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    from pipeline.catalog import resolve_datasets
    from pipeline.datasets import prepare

    for spec in resolve_datasets(args.datasets):  # simulate + cache outside the timed runs
        prepare(spec)
    results = []
    for mode in args.modes.split(","):
        r = run_sequential(args, out / mode) if mode == "sequential" else run_pipeline(mode, args, out / mode)
        results.append(r)
        print(f"{mode}: {r['wall_s']:.0f} s", flush=True)
    print(f"\n{os.cpu_count()} CPUs; --datasets {args.datasets} --search --max-epochs {args.max_epochs}\n")
    print("| mode | trials | job wall s | Tune wall s | time in training steps s | overhead share | overhead s/trial |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        per_trial = (r["tune_wall_s"] * r["slots"] - r["train_time_s"]) / max(r["trials"], 1)
        print(f"| {r['mode']} | {r['trials']} | {r['wall_s']:.0f} | {r['tune_wall_s']:.0f} | {r['train_time_s']:.0f} | "
              f"{r['overhead_share']:.0%} | {per_trial:.1f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
