"""Soak: N small pretraining jobs in a row; after each, what is left behind and how much memory is held.

    python bench/soak.py [--jobs 20] [--mode inprocess|subprocess] [--json soak-results.json]

Each job is `pipeline.job.pretrain_all` on one small simulated dataset (2 epochs, 2 search points, MLflow on a
SQLite store in the soak folder) with its own local Ray, started and stopped by the job. All temp files of
the jobs go to one folder (TMPDIR / RAY_TMPDIR), so the figures are ours, not other programs' on the machine:

- ray procs: processes still alive 30 s after the job whose environment points at that folder (0 = no leak);
- ports:     TCP ports those processes still listen on;
- tmp MB:    size of the temp folder (Ray keeps one session folder of logs per run: expected growth,
             `--clean-ray-sessions` removes finished sessions between jobs to show the rest is flat);
- rss MB:    in-process mode: this driver's resident memory after the job (flat = nothing accumulates
             across jobs in our driver code or Ray's client); subprocess mode: the job's peak RSS.

Writes the table and its summary to bench/soak.md (--out).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, header, load_note, md_table, parser, write_record  # noqa: E402

REPO = ROOT


def owned_processes(marker: str) -> list[psutil.Process]:
    """Live processes (not us) whose environment holds `marker` (the soak's temp folder)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("RAY_TMPDIR") == marker and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def listening_ports(procs: list[psutil.Process]) -> list[int]:
    ports = []
    for p in procs:
        try:
            ports += [c.laddr.port for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, OSError):
            continue
    return sorted(ports)


def folder_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total / 1e6


def clean_ray_sessions(tmp: Path) -> None:
    """Remove finished Ray session folders (what `ray stop` users clean by hand)."""
    for session in (tmp / "ray").glob("session_2*"):
        shutil.rmtree(session, ignore_errors=True)


def job_args(data: str, out: Path, soak: Path, i: int) -> list[str]:
    return [
        "--datasets",
        data,
        "--search-space",
        '{"hidden_dim": [16, 32]}',
        "--max-epochs",
        "2",
        "--num-cpus",
        "2",
        "--verbose",
        "0",
        "--mlflow-uri",
        f"sqlite:///{soak / 'mlflow.db'}",
        "--out",
        str(out / f"job{i}"),
    ]


def run_inprocess(args_list: list[str]) -> tuple[int, float]:
    from pipeline.job import pretrain_all

    code = pretrain_all.main(args_list)
    return code, psutil.Process().memory_info().rss / 1e6


def run_subprocess(args_list: list[str], env: dict) -> tuple[int, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.job.pretrain_all", *args_list],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0.0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, ps.memory_info().rss / 1e6)
        time.sleep(0.2)
    return proc.returncode, peak


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--mode", choices=("inprocess", "subprocess"), default="inprocess")
    ap.add_argument("--transitions", type=int, default=4000, help="size of the simulated dataset")
    ap.add_argument(
        "--clean-ray-sessions", action="store_true", help="delete finished Ray session logs between jobs"
    )
    add_out(ap, ROOT / "bench" / "soak.md")
    ap.add_argument("--json", default=None, help="also write every row and the summary as JSON here")
    args = ap.parse_args(argv)

    soak = Path(tempfile.mkdtemp(prefix="invdyn-soak-"))
    tmp = soak / "tmp"
    tmp.mkdir()
    marker = str(tmp)
    env_over = {
        "TMPDIR": marker,
        "RAY_TMPDIR": marker,
        "INVDYN_HOME": str(soak / "home"),
        "D4RL_DATASET_DIR": str(soak / "d4rl"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    os.environ.update(env_over)
    os.environ.pop("RAY_ADDRESS", None)
    tempfile.tempdir = None  # re-read TMPDIR
    title = "Soak: jobs in a row, what each leaves behind"
    lines = header(title, "bench/soak.py", "CPU only, " + load_note())
    from pipeline.sim.simulate import simulate

    data = str(
        simulate("sim-hopper-random-v0", transitions=args.transitions, out_dir=soak / "d4rl", progress=False)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    print(f"soak folder {soak}; {args.jobs} job(s), mode {args.mode}")
    print(f"{'job':>4} {'exit':>4} {'wall s':>7} {'ray procs':>9} {'ports':>5} {'tmp MB':>7} {'rss MB':>7}")
    base_rss = psutil.Process().memory_info().rss / 1e6
    for i in range(args.jobs):
        started = time.time()
        a = job_args(data, soak / "out", soak, i)
        code, rss = run_inprocess(a) if args.mode == "inprocess" else run_subprocess(a, env)
        wall = time.time() - started
        settle = time.time()
        while (left := owned_processes(marker)) and time.time() - settle < 30:
            time.sleep(0.5)  # ray.shutdown() returns before its processes are gone: give them 30 s
        if args.clean_ray_sessions:
            clean_ray_sessions(tmp)
        row = {
            "job": i + 1,
            "exit": code,
            "wall_s": round(wall, 1),
            "ray_procs": len(left),
            "ports": listening_ports(left),
            "tmp_mb": round(folder_mb(tmp), 1),
            "rss_mb": round(rss, 1),
            "left": [" ".join(p.cmdline())[:120] for p in left[:5]],
        }
        rows.append(row)
        print(
            f"{row['job']:>4} {code:>4} {wall:>7.1f} {len(left):>9} {len(row['ports']):>5} "
            f"{row['tmp_mb']:>7.1f} {row['rss_mb']:>7.1f}",
            flush=True,
        )
    rss = [r["rss_mb"] for r in rows]
    summary = {
        "jobs": args.jobs,
        "mode": args.mode,
        "failed_jobs": sum(r["exit"] != 0 for r in rows),
        "max_ray_procs_left": max(r["ray_procs"] for r in rows),
        "max_ports_left": max(len(r["ports"]) for r in rows),
        "tmp_mb_first": rows[0]["tmp_mb"],
        "tmp_mb_last": rows[-1]["tmp_mb"],
        "tmp_mb_per_job": round((rows[-1]["tmp_mb"] - rows[0]["tmp_mb"]) / max(1, len(rows) - 1), 2),
        "rss_mb_start": round(base_rss, 1),
        "rss_mb_first": rss[0],
        "rss_mb_last": rss[-1],
        "rss_mb_per_job_after_first": round((rss[-1] - rss[0]) / max(1, len(rss) - 1), 2),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    head = ["job", "exit", "wall s", "ray procs", "ports", "tmp MB", "rss MB"]
    keys = ("job", "exit", "wall_s", "ray_procs", "ports", "tmp_mb", "rss_mb")
    table = [[len(r[k]) if k == "ports" else r[k] for k in keys] for r in rows]
    lines += [f"{args.jobs} job(s), mode {args.mode}.", "", *md_table(head, table), ""]
    lines += [f"- {k}: {v}" for k, v in summary.items() if k != "rows"]
    write_record(lines, args.out)
    for p in owned_processes(marker):  # leave nothing behind ourselves (only processes of this soak)
        p.kill()
    shutil.rmtree(soak, ignore_errors=True)
    return 0 if summary["failed_jobs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
