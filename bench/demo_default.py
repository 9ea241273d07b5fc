"""Which suite should the README's main job train by default: a good model in the fewest minutes on 2 cores.

    nice -n 10 python bench/demo_default.py --suites sim,sim-medium-expert --work runs/demo_default

Per candidate suite, the job a new user runs (`python -m pipeline.pretrain_all --datasets SUITE`) runs from an
empty data folder and cache, so its wall time includes generating the data. Then every model is scored on
its own test episodes and on the other candidates' data of the same env (all rows: data it never saw), so
the table says which default gives a model that also serves the other kind of data. Results are kept in
WORK/results.json; `--no-run` only writes the table. Writes bench/demo_default.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, add_work, load_note, machine, md_table, measured_on, parser  # noqa: E402


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--suites", default="sim,sim-medium-expert", help="comma-separated candidate suites")
    add_work(ap, "runs/demo_default", "jobs, data and results")
    add_out(ap, ROOT / "bench" / "demo_default.md")
    ap.add_argument("--job-args", default="", help="extra flags for every candidate's job")
    ap.add_argument("--no-run", action="store_true", help="only write the table from WORK/results.json")
    return ap.parse_args(argv)


def env_of(name: str) -> str:
    return name.split("-")[1]  # sim-<env>-<policy>-v0


def run_job(suite: str, args, work: Path) -> dict:
    """The job a new user runs, from an empty data folder and cache; its wall time and summary."""
    home = work / suite
    env = dict(os.environ, D4RL_DATASET_DIR=str(home / "d4rl"), INVDYN_HOME=str(home / "invdyn-home"))
    cmd = [sys.executable, "-m", "pipeline.pretrain_all", "--datasets", suite, "--out", str(home / "out")]
    cmd += args.job_args.split()
    print(f"{suite}: {' '.join(cmd[1:])}", flush=True)
    where = machine("CPU only, " + load_note())
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    summary = json.loads((home / "out" / "summary.json").read_text())
    shown = ["python", *cmd[1:-1], "DIR"]  # the output folder is this bench's, not part of the command
    return {
        "suite": suite,
        "wall_s": wall,
        "command": " ".join(shown),
        "models": summary,
        "machine": where,
    }


def score(model_dir: str, data_path: str, env: dict) -> dict:
    """`pipeline.evaluate` on a file: its test part when the model was trained on it, else all rows."""
    cmd = [sys.executable, "-m", "pipeline.evaluate", model_dir, data_path, "--json"]
    out = subprocess.run(cmd, env=env, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return json.loads(out)


def cross_scores(jobs: list[dict], work: Path) -> list[dict]:
    """Each model on its own data's test part and on every other candidate's data of its env."""
    files = {
        (job["suite"], env_of(m["dataset"])): str(Path(m["source"])) for job in jobs for m in job["models"]
    }
    rows = []
    for job in jobs:
        env = dict(os.environ, INVDYN_HOME=str(work / job["suite"] / "invdyn-home"))
        for m in job["models"]:
            for other in jobs:
                path = files.get((other["suite"], env_of(m["dataset"])))
                if path is None:
                    continue
                result = score(m["model_dir"], path, env)
                print(f"{m['dataset']} on {Path(path).stem}: R² {r2(result)}", flush=True)
                rows.append(
                    {
                        "trained_on": m["dataset"],
                        "suite": job["suite"],
                        "scored_on": Path(path).stem,
                        "result": result,
                    }
                )
    return rows


def r2(result: dict) -> float | None:
    """The mean over action dimensions of `pipeline.evaluate`'s per-dimension R²."""
    per_dim = result.get("per_dim_r2")
    return None if not per_dim else sum(per_dim) / len(per_dim)


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}g}"


def write_markdown(results: dict, args, path: Path) -> None:
    jobs, rows = results["jobs"], results["scores"]
    lines = [
        "# The main job's default suite: which data gives a good model in the fewest minutes",
        "",
        "```bash",
        f"nice -n 10 python bench/demo_default.py --suites {args.suites}"
        + (f" --job-args '{args.job_args}'" if args.job_args else ""),
        "```",
        "",
        f"Machine: {measured_on(jobs)}. "
        "Each job ran from an empty data folder and "
        "cache (its wall time includes generating the data), with the job's defaults. Scores: "
        "`python -m pipeline.evaluate MODEL FILE --json`: on the model's own file its test episodes "
        "(no choice read them); on another file every row (data the model never saw). R² is the mean over "
        "action dimensions; drift@32 the normalized-state RMSE after 32 closed-loop MuJoCo steps.",
        "",
        *md_table(
            ["suite", "job wall (min)", "command"],
            [[j["suite"], f"{j['wall_s'] / 60:.1f}", f"`{j['command']}`"] for j in jobs],
        ),
        "",
    ]
    cells = []
    for r in rows:
        res = r["result"]
        cells.append(
            [r["trained_on"], r["scored_on"], res.get("part"), _fmt(res.get("heldout_mse")), _fmt(r2(res), 3)]
            + [_fmt(res.get("one_step_error"), 3), _fmt(res.get("tracking_drift"), 3)]
        )
    head = ["trained on", "scored on", "part", "action MSE", "R²", "one-step error", "drift@32"]
    lines += md_table(head, cells)
    if str(path) == "-":
        print("\n".join(lines))
        return
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    store = work / "results.json"
    if args.no_run:
        results = json.loads(store.read_text())
    else:
        work.mkdir(parents=True, exist_ok=True)
        jobs = [run_job(suite, args, work) for suite in args.suites.split(",")]
        results = {"jobs": jobs, "scores": cross_scores(jobs, work)}
        store.write_text(json.dumps(results, indent=1))
    write_markdown(results, args, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
