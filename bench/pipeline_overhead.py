"""Wall time of `pipeline.job.pretrain_all` and the share of it not spent in training steps.

    python bench/pipeline_overhead.py [--datasets sim] [--max-epochs 15] [--modes local,train,sequential]
                                      [--work runs/pipeline_overhead] [--json results.json]

Modes (same datasets, same --search grid, same epochs, same seeds):
  local       pretrain_all --executor local (the default): each trial's TorchTrainer in Train's local mode,
              in the Tune trial's own process (reused from trial to trial)
  train       pretrain_all --executor train: each trial's TorchTrainer with a Train worker process of its own
  sequential  the same trainings one after another in this process, with all CPUs as torch threads
              (--sequential-threads 1: as one pipeline trial gets; on a busy machine 2 threads thrash)

"not in training steps" = 1 - (sum of the trials' time inside training steps) / (Tune's wall time x trials at
once); "of the whole job's wall" uses the job's wall time instead (Ray start-up, dataset loading, the
evaluation of the chosen models and the summary included); "orchestration" counts the per-epoch
validation of the training loop as training too (it is the early stopping, not Ray). For `sequential` the
denominator is its wall time. orchestration s/trial = the slot-seconds outside the training loop, per
trial: what a longer training amortizes. Datasets are prepared (simulated + cached) first and not timed.
Writes the Markdown table to bench/pipeline_overhead.md (--out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, add_work, header, load_note, md_table, parser, write_record  # noqa: E402


def run_pipeline(executor: str, args, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.job.pretrain_all",
        "--datasets",
        args.datasets,
        "--search",
        "--executor",
        executor,
        "--out",
        str(out),
        "--no-mlflow",
        "--verbose",
        "0",
    ]
    if args.max_epochs:
        cmd += ["--max-epochs", str(args.max_epochs)]
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
        "eval_time_s": last.get("eval_time_s") or 0.0,
        "trials": last["ran"],
        "slots": last["training_slots"],  # trials training at once
        "overhead_share": last["overhead_share"],
        "best": {r["dataset"]: r.get("heldout_mse") for r in records},
    }


def run_sequential(args, out: Path) -> dict:
    from pipeline.data.catalog import resolve_datasets
    from pipeline.data.sources import load_transitions
    from pipeline.training import search
    from pipeline.training.config import TrainConfig
    from pipeline.training.machine import available_cpus
    from pipeline.training.trainer import train

    points = search.grid_points(search.DEFAULT_GRID)
    t0 = time.time()
    train_s, eval_s, n, best = 0.0, 0.0, 0, {}
    for spec in resolve_datasets(args.datasets):
        t = load_transitions(spec)
        for i, point in enumerate(points):
            threads = args.sequential_threads or available_cpus()
            epochs = {"max_epochs": args.max_epochs} if args.max_epochs else {}
            cfg = TrainConfig(**point, **epochs, seed=0, threads=threads, device="cpu")
            r = train(t, cfg, out / t.name / str(i), dataset_name=t.name)
            train_s += r.metrics["train_time_s"]
            eval_s += r.metrics["eval_time_s"]
            n += 1
            best[t.name] = min(best.get(t.name, float("inf")), r.metrics["heldout_mse"])
    wall = time.time() - t0
    return {
        "mode": "sequential",
        "wall_s": wall,
        "tune_wall_s": wall,
        "train_time_s": train_s,
        "eval_time_s": eval_s,
        "trials": n,
        "slots": 1,
        "overhead_share": 1 - train_s / wall,
        "best": best,
    }


def cells(r: dict) -> list[str]:
    """One mode's row: its times and the shares of them outside training steps and the training loop."""
    slot_s = r["tune_wall_s"] * r["slots"]
    loop_s = r["train_time_s"] + r["eval_time_s"]
    per_trial = (slot_s - loop_s) / max(r["trials"], 1)
    times = [f"{r[k]:.0f}" for k in ("wall_s", "tune_wall_s", "train_time_s", "eval_time_s")]
    shares = [1 - r["train_time_s"] / slot_s, 1 - r["train_time_s"] / (r["wall_s"] * r["slots"])]
    shares.append(1 - loop_s / slot_s)
    return [r["mode"], r["trials"], *times, *(f"{x:.1%}" for x in shares), f"{per_trial:.1f}"]


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--datasets", default="sim")
    ap.add_argument(
        "--max-epochs", type=int, help="cap every trial's epochs (default: the trainer's, as the job)"
    )
    ap.add_argument("--modes", default="local,train,sequential")
    add_work(ap, ROOT / "runs" / "pipeline_overhead", "each mode's job output")
    add_out(ap, ROOT / "bench" / "pipeline_overhead.md")
    ap.add_argument(
        "--sequential-threads", type=int, help="torch threads of `sequential` (default: all CPUs)"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    out = Path(args.work).resolve()
    title = "The job's wall time and its share outside training"
    lines = header(title, "bench/pipeline_overhead.py", "CPU only, " + load_note())
    from pipeline.data.catalog import resolve_datasets
    from pipeline.data.sources import prepare

    for spec in resolve_datasets(args.datasets):  # simulate + cache outside the timed runs
        prepare(spec)
    results = []
    for mode in args.modes.split(","):
        r = run_sequential(args, out / mode) if mode == "sequential" else run_pipeline(mode, args, out / mode)
        results.append(r)
        print(f"{mode}: {r['wall_s']:.0f} s", flush=True)
    lines += [f"--datasets {args.datasets} --search --max-epochs {args.max_epochs or 'default'}", ""]
    head = ["mode", "trials", "job wall s", "Tune wall s", "in training steps s", "in validation s"]
    head += ["not in training steps", "the same, of the whole job's wall"]
    head += ["not in the training loop (orchestration)", "orchestration s/trial"]
    write_record([*lines, *md_table(head, [cells(r) for r in results])], args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
