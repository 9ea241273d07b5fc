"""The end of bench/device/run.sh: its steps' logs and results -> OUTDIR/tables.md (every table, the steps'
status and wall times), OUTDIR/summary.json (the same as data, read by bench/capacity.py) and
OUTDIR/logs.tar.gz (logs, job summaries, ledgers, curves, params.json; no weights, no Ray storage).

    python bench/device/report.py WORK OUTDIR --device cuda --quick 0 --total-s 300

Exits 0 when every step passed, 3 when some failed (the three files are written either way).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tarfile
import time
from pathlib import Path

#: files of a step's results that go into logs.tar.gz
KEPT_SUFFIXES = (".log", ".md", ".json", ".csv", ".txt", ".tsv")
#: folders under a result that are left out (checkpoints of every trial; Ray's own storage)
LEFT_OUT = ("ray",)
#: over this the archive drops the per-trial ledgers first (the device tool brings back 16 MiB a file)
ARCHIVE_LIMIT = 15 * 2**20


def read_steps(work: Path) -> list[dict]:
    with (work / "steps.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        r["status"] = {
            "0": "ok",
            "124": "timed out",
            "missing": "not in checkout",
            "budget": "no time left",
        }.get(r["rc"], f"failed (rc {r['rc']})")
        r["wall_s"] = float(r["wall_s"])
    return rows


def log_text(work: Path, step: str) -> str:
    p = work / "logs" / f"{step}.log"
    return p.read_text(errors="replace") if p.is_file() else ""


def env_of(work: Path) -> dict:
    for line in reversed(log_text(work, "env").splitlines()):
        if line.startswith("ENV "):
            return json.loads(line[4:])
    return {}


def table_lines(text: str) -> str:
    """The Markdown table rows of a bench's output, with the lines just above each table (its title)."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if not out or not out[-1].startswith("|"):
                out += ["", *[p for p in lines[max(0, i - 2) : i] if p.strip() and not p.startswith("|")]]
            out.append(line)
    return "\n".join(out).strip()


def parse_tables(text: str) -> list[dict]:
    """Every row of the Markdown tables in `text` as {column header: cell}, for bench/capacity.py."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def job_result(work: Path, name: str, step: dict | None) -> dict | None:
    """The job's own timing (job.json) and the best held-out MSE per dataset (summary.json)."""
    folder = work / "results" / name
    if step is None or not (folder / "job.json").is_file():
        return None
    job = json.loads((folder / "job.json").read_text())
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else []
    last = job.get("last_run", {})
    return {
        "step": name,
        "wall_s_run_sh": step["wall_s"],
        "job_wall_s": last.get("wall_s"),
        "tune_wall_s": last.get("tune_wall_s"),
        "train_time_s": last.get("train_time_s"),
        "trials": last.get("ran"),
        "failed": last.get("failed"),
        "training_slots": last.get("training_slots"),
        "overhead_share": last.get("overhead_share"),
        "gpus_per_trial": job.get("placement", {}).get("gpus"),
        "heldout_mse": {r["dataset"]: r.get("heldout_mse") for r in summary},
        "population": {r["dataset"]: r.get("population") for r in summary if r.get("population")},
    }


def shown(command: str, work: Path) -> str:
    """A step's command as the table shows it: the run's temporary folder as WORK, long ones cut."""
    command = command.replace(str(work), "WORK")
    return command if len(command) <= 160 else command[:157] + "..."


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def job_table(jobs: list[dict]) -> str:
    rows = [
        "| run | wall s (run.sh, Ray start included) | Tune wall s | trials | at once | GPU per trial "
        "| not in training steps | members per population trial | best held-out MSE per dataset |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        mse = ", ".join(
            f"{d.removeprefix('sim-').removesuffix('-v0')} {_fmt(v, '.5f')}"
            for d, v in j["heldout_mse"].items()
        )
        rows.append(
            f"| {j['step']} | {j['wall_s_run_sh']:.1f} | {_fmt(j['tune_wall_s'])} | {j['trials']} "
            f"| {j['training_slots']} | {_fmt(j['gpus_per_trial'], 'g')} "
            f"| {_fmt(j['overhead_share'], '.1%')} "
            f"| {', '.join(str(k) for k in sorted(set(j['population'].values()))) or '-'} | {mse} |"
        )
    return "\n".join(rows)


def tables(work: Path, steps: list[dict], env: dict, jobs: list[dict], args) -> str:
    by = {s["step"]: s for s in steps}
    machine = (
        f"{env.get('gpu', 'no GPU')}, {env.get('cpus')} CPUs, Python {env.get('python')}, "
        f"torch {env.get('torch')} "
        f"(CUDA {env.get('cuda_runtime')}), Ray {str(env.get('ray', '?')).split(' ')[0]}"
    )
    md = [
        f"# Device run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: --device {args.device}"
        + (" --quick (tiny budgets: not figures to report)" if args.quick else ""),
        "",
        f"Machine: {machine}. Whole run: {args.total_s:.0f} s.",
        "",
        "| step | status | wall s | command |",
        "|---|---|---|---|",
        *[
            f"| {s['step']} | {s['status']} | {s['wall_s']:.1f} | `{shown(s['command'], work)}` |"
            for s in steps
        ],
    ]
    if "throughput" in by:
        md += [
            "",
            f"## Training throughput: `{by['throughput']['command']}`",
            table_lines(log_text(work, "throughput")),
        ]
    if "population" in by:
        found = sorted((work / "results" / "population").glob("*.md"))
        text = "\n\n".join(p.read_text() for p in found) or table_lines(log_text(work, "population"))
        md += ["", f"## Population: `{by['population']['command']}`", text]
    if jobs:
        md += ["", "## pretrain_all on the sim suite, local Ray", job_table(jobs)]
        for j in jobs:
            summary = work / "results" / j["step"] / "summary.md"
            if summary.is_file():
                md += ["", f"### {j['step']}: summary.md", summary.read_text().strip()]
    return "\n".join(md) + "\n"


def archive(work: Path, dst: Path) -> None:
    files = [work / "steps.tsv", *sorted((work / "logs").glob("*"))]
    for p in sorted((work / "results").rglob("*")):
        rel = p.relative_to(work / "results").parts
        if p.is_file() and p.suffix in KEPT_SUFFIXES and not set(rel[1:-1]) & set(LEFT_OUT):
            files.append(p)
    for drop_ledgers in (False, True):
        with tarfile.open(dst, "w:gz") as tar:
            for p in files:
                if not (drop_ledgers and "trials" in p.parts):
                    tar.add(p, arcname=str(p.relative_to(work)))
        if dst.stat().st_size <= ARCHIVE_LIMIT:
            return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("outdir", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", type=int, default=0)
    p.add_argument("--total-s", type=float, default=0.0)
    args = p.parse_args(argv)
    steps = read_steps(args.work)
    env = env_of(args.work)
    by = {s["step"]: s for s in steps}
    jobs = [j for j in (job_result(args.work, n, by.get(n)) for n in ("job", "job_population")) if j]
    md = tables(args.work, steps, env, jobs, args)
    args.outdir.mkdir(parents=True, exist_ok=True)
    (args.outdir / "tables.md").write_text(md)
    summary = {"device": args.device, "quick": bool(args.quick), "total_s": args.total_s, "env": env}
    population = sorted((args.work / "results" / "population").glob("*.md"))
    summary |= {
        "steps": steps,
        "jobs": jobs,
        "throughput_rows": parse_tables(log_text(args.work, "throughput")) if "throughput" in by else [],
        "population_rows": parse_tables("\n".join(p.read_text() for p in population)),
    }
    (args.outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    archive(args.work, args.outdir / "logs.tar.gz")
    print(md)
    failed = [s["step"] for s in steps if s["status"] != "ok"]
    print(
        f"run.sh: {len(steps) - len(failed)} of {len(steps)} steps ok"
        + (f"; not ok: {', '.join(failed)}" if failed else "")
    )
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
