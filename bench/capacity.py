"""An ESTIMATE of the job's wall time on the D4RL locomotion suite (15 datasets) with the default search, on
1, 4 and 16 GPUs, from measured per-sample training rates and the job's measured orchestration overhead.

    python bench/capacity.py                         # the inputs measured so far -> bench/capacity.md
    python bench/capacity.py --device-run DIR        # also the rates of a bench/device/run.sh output folder
    python bench/capacity.py --out -                 # print instead of writing bench/capacity.md

The model: a dataset of N transitions trains on 70% of its episodes (the default split) for up to 60 epochs
(the default cosine schedule's length; early stopping can end a trial sooner, so the times are upper
bounds), once per search point (hidden 256/512/1024 x dropout 0/0.1/0.2). A trial's time = its training
samples / the per-trial rate x (1 + the validation share) + the per-trial orchestration. Trials are placed
longest first on the free slot (the job does the same: trials start longest first) and the job adds its
fixed cost (Ray start, dataset parsing, outputs). Every input below names where it was measured.
"""

from __future__ import annotations

import heapq
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, md_table, parser  # noqa: E402

#: D4RL v2 locomotion files: transitions (rows), as D4RL publishes them (the catalog holds no sizes; a
#: file found under $D4RL_DATASET_DIR is counted instead, see rows_of)
D4RL_ROWS = {
    **{f"{env}-{kind}-v2": 1_000_000 for env in ("halfcheetah", "hopper", "walker2d") for kind in
       ("random", "medium", "expert")},
    **{f"{env}-medium-expert-v2": 2_000_000 for env in ("halfcheetah", "hopper", "walker2d")},
    "halfcheetah-medium-replay-v2": 202_000,
    "hopper-medium-replay-v2": 402_000,
    "walker2d-medium-replay-v2": 302_000,
}  # fmt: skip
HIDDEN = (256, 512, 1024)  # the default grid's hidden sizes; each runs with 3 dropouts
DROPOUTS = 3
EPOCHS = 60  # TrainConfig.max_epochs
TRAIN_FRACTION = 0.7  # 1 - TrainConfig.val_fraction - TrainConfig.test_fraction (episodes)
GPU_COUNTS = (1, 4, 16)
TRIALS_PER_GPU = 4  # --gpus-per-trial defaults to 1/4 when the cluster has GPUs


@dataclass(frozen=True)
class Measured:
    """One measured input, with where it comes from."""

    value: float
    source: str


#: docs/training.md, "Speed" (on a GPU): the eager step, one NVIDIA H200, fp32, hidden 512, batch 512
GPU_EAGER = Measured(
    352_452,
    "train samples/s of the eager step, fp32, hidden 512, batch 512, halfcheetah dims, one NVIDIA H200, "
    "16 CPUs (`python bench/train_throughput.py --device cuda --epochs 3 --rounds 3 --skip-early-stop`, "
    "docs/training.md 'Speed', an earlier session)",
)
#: docs/ray-job.md, "How it places work": the sim suite with --search, local executor, 2 slots
#: (pipeline_overhead.py)
VALIDATION_SHARE = Measured(
    166 / 1891,
    "per-epoch validation time / time in training steps: 166 / 1891 slot-s "
    "(`python bench/pipeline_overhead.py --modes local`, docs/ray-job.md, 2-core AMD EPYC)",
)
ORCHESTRATION_PER_TRIAL = Measured(
    1.4,
    "slot-seconds per trial outside the training loop (same run: 1.8% of 2 x 1048 s over 27 trials)",
)
JOB_FIXED_S = Measured(
    16.0,
    "job wall minus Tune's wall (Ray start, loading, outputs): 1064 s - 1048 s, where 1048 s = "
    "1891 slot-s / (2 slots x (1 - 9.8%)) (same run)",
)
PARSE_S_PER_M = Measured(
    1.2,
    "seconds to parse 1M transitions into the Arrow cache, once per dataset on the driver "
    "(`python bench/dataset_cache.py`, docs/datasets.md 'Cache')",
)


def rows_of(name: str, d4rl_dir: Path | None) -> tuple[int, str]:
    """Transitions of a dataset: counted in its file when one is on disk, else D4RL's published size."""
    if d4rl_dir is not None:
        from pipeline.data.catalog import CATALOG

        path = d4rl_dir / CATALOG[name]["url"].rsplit("/", 1)[-1]
        if path.is_file():
            import h5py

            with h5py.File(path, "r") as f:
                return int(f["observations"].shape[0]), "counted in the file"
    return D4RL_ROWS[name], "D4RL's published size"


@dataclass(frozen=True)
class Trial:
    dataset: str
    hidden: int
    samples: float  # training samples over EPOCHS epochs


def trials(sizes: dict[str, int], population: bool = False) -> list[Trial]:
    """One trial per dataset and search point; with `population` one per dataset (its points' samples)."""
    out = []
    for name, rows in sizes.items():
        points = [Trial(name, hidden, EPOCHS * TRAIN_FRACTION * rows) for hidden in HIDDEN] * DROPOUTS
        out += [Trial(name, 0, sum(t.samples for t in points))] if population else points
    return out


def makespan(durations: list[float], slots: int) -> float:
    """Longest first onto the slot that frees first (as the job orders its trials)."""
    free = [0.0] * slots
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(free, free[0] + d)
    return max(free)


@dataclass(frozen=True)
class Scenario:
    """How fast one trial trains and how many train at once."""

    label: str
    rate: float  # train samples/s of one trial at hidden 512 when it has the device alone
    gpus: int
    slots: int  # trials training at once
    per_slot: float  # fraction of `rate` each slot gets when all slots are busy
    population: bool = False  # one trial per dataset holding its 9 search points; rate = their aggregate


def estimate(sc: Scenario, tr: list[Trial], rows_total: float) -> dict:
    """The job's wall time: the trials placed longest first on the slots, plus the job's fixed cost. The
    rate does not depend on the hidden size: the GPU step is bound by kernel launches (see render)."""
    rate = sc.rate * sc.per_slot
    durations = [t.samples / rate * (1 + VALIDATION_SHARE.value) + ORCHESTRATION_PER_TRIAL.value for t in tr]
    fixed = JOB_FIXED_S.value + PARSE_S_PER_M.value * rows_total / 1e6
    wall = makespan(durations, sc.slots) + fixed
    return {
        "scenario": sc.label,
        "gpus": sc.gpus,
        "slots": sc.slots,
        "wall_s": wall,
        "longest_s": max(durations),
        "busy_s": sum(durations),
    }


def device_run_rates(folder: Path) -> dict[str, Measured]:
    """The graph and eager step's rates from a bench/device/run.sh output folder (summary.json)."""
    summary = json.loads((folder / "summary.json").read_text())
    if summary.get("quick") or summary.get("device") != "cuda":
        raise SystemExit(f"{folder}: not a full --device cuda run (quick runs are not figures)")
    gpu = summary.get("env", {}).get("gpu", "GPU")
    out = {}
    for row in summary.get("throughput_rows", []):
        contender, step = row.get("contender", ""), row.get("step", "")
        rate = float(row.get("train samples/s", "0").replace(",", "") or 0)
        where = f"{row.get('contender')} ({step}), {gpu}, bench/device/run.sh output {folder}"
        if contender == "ours fp32" and step == "CUDA graph":
            out["graph"] = Measured(rate, f"train samples/s of the CUDA-graph step: {where}")
        if contender == "ours fp32, eager step" or (contender == "ours fp32" and step == "eager"):
            out["eager"] = Measured(rate, f"train samples/s of the eager step: {where}")
    for row in summary.get("population_rows", []):
        if row.get("K") == "9":
            rate = float(row.get("population samples/s", "0").replace(",", "") or 0)
            out["population"] = Measured(
                rate, f"aggregate train samples/s of a population of 9 (bench/population.py), {gpu}, {folder}"
            )
    return out


def measured_job(folder: Path) -> float | None:
    """run.sh's wall time of the sim-suite job with --search (Ray start included), when it passed."""
    summary = json.loads((folder / "summary.json").read_text())
    done = {s["step"]: s for s in summary.get("steps", []) if s.get("status") == "ok"}
    return done["job"]["wall_s"] if "job" in done else None


def scenarios(rates: dict[str, Measured]) -> list[Scenario]:
    out = []
    for key, label in (("eager", "eager step"), ("graph", "CUDA-graph step")):
        if key not in rates:
            continue
        r = rates[key].value
        for g in GPU_COUNTS:
            slots = g * TRIALS_PER_GPU
            # how 4 processes share one GPU is not measured: from "no gain" (the GPU's rate is one
            # trial's, split 4 ways) to "no loss" (each runs as fast as alone, the card being ~1% busy)
            out.append(Scenario(f"{label}, {g} GPU, 4 trials/GPU sharing with no gain", r, g, slots, 0.25))
            out.append(Scenario(f"{label}, {g} GPU, 4 trials/GPU sharing with no loss", r, g, slots, 1.0))
    if "population" in rates:
        for g in GPU_COUNTS:
            label = f"--population (9 members per trial), {g} GPU, 1 trial/GPU"
            out.append(Scenario(label, rates["population"].value, g, g, 1.0, population=True))
    return out


def render(results: list[dict], rates: dict[str, Measured], tr: list[Trial], d4rl_dir: Path | None) -> str:
    rows_total = sum(rows_of(n, d4rl_dir)[0] for n in D4RL_ROWS)
    sources = {rows_of(n, d4rl_dir)[1] for n in D4RL_ROWS}
    hours = lambda s: f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"  # noqa: E731
    when = lambda r: [hours(r["longest_s"]), hours(r["busy_s"])]  # noqa: E731
    lines = [
        "# Capacity: the D4RL locomotion suite with the default search (ESTIMATE)",
        "",
        "**An estimate, not a measurement**: computed by `python bench/capacity.py` from the measured inputs "
        "listed below. Every trial is counted at the full 60 epochs (early stopping ends some sooner, which "
        "would shorten these). No job on D4RL data and no trial on a GPU under Ray has been timed yet.",
        "",
        f"Work: {len(D4RL_ROWS)} datasets ({rows_total / 1e6:.1f}M transitions, "
        f"{', '.join(sorted(sources))}), "
        f"{len(tr)} trials (9 search points each), {sum(t.samples for t in tr) / 1e9:.2f}G training samples "
        f"at {EPOCHS} epochs on {TRAIN_FRACTION:.0%} of the episodes.",
        "",
        *md_table(
            ["where", "trials at once", "estimated job wall", "longest trial", "device-busy time"],
            [[r["scenario"], r["slots"], f"**{hours(r['wall_s'])}**", *when(r)] for r in results],
        ),
    ]
    lines += ["", "Inputs (each measured where it says; the model is in the script's docstring):", ""]
    names = {"eager": "GPU eager step", "graph": "GPU CUDA-graph step", "population": "GPU population of 9"}
    inputs = [(names[k], v) for k, v in rates.items()]
    inputs += [("validation", VALIDATION_SHARE), ("orchestration", ORCHESTRATION_PER_TRIAL)]
    inputs += [("job fixed cost", JOB_FIXED_S), ("dataset parsing", PARSE_S_PER_M)]
    for name, m in inputs:
        shown = f"{m.value:,.0f}" if m.value >= 100 else f"{m.value:.4g}"
        lines.append(f"- {name}: {shown} -- {m.source}")
    lines += [
        "",
        "Assumptions (not measured): on the GPU a trial's rate does not depend on the hidden size (the eager "
        "step is bound by kernel launches: 1.45 ms per step at 1% of the card's fp32 peak, and hidden 1024 "
        "has 3.8x the FLOPs of 512); the 2-core CPU job's orchestration and validation shares hold on a GPU "
        "node; one trial per dataset and search point (no `--population`); the D4RL files are on disk (no "
        "download). A population (`--population`: one trial per dataset holding its 9 search points) "
        "changes the GPU rows most; its rate comes from `bench/population.py --device cuda` "
        "(bench/device/run.sh), not measured yet.",
    ]
    return "\n".join(lines) + "\n"


def model_check(rates: dict[str, Measured], measured: float | None) -> str:
    """The same model on the one GPU job the device run timed: the sim suite, 27 trials of 50k rows."""
    key = "graph" if "graph" in rates else "eager"  # the job trains with the graph step on a GPU
    sim = trials({f"sim-{env}": 50_000 for env in ("halfcheetah", "hopper", "walker2d")})
    low, high = (
        estimate(Scenario("sim", rates[key].value, 1, TRIALS_PER_GPU, share), sim, 150_000)["wall_s"]
        for share in (1.0, 0.25)
    )
    got = f"run.sh measured {measured:.0f} s" if measured is not None else "run.sh's job step did not pass"
    return (
        f"\nCheck of the model on the sim suite with --search on 1 GPU ({key} step, 27 trials at 60 epochs): "
        f"{low:.0f}-{high:.0f} s estimated; {got} (the estimate counts 60 epochs a trial; early stopping "
        "ends some sooner).\n"
    )


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--device-run", type=Path, default=None, help="a bench/device/run.sh output folder")
    p.add_argument("--d4rl-dir", type=Path, default=None, help="count rows in the D4RL files found here")
    add_out(p, ROOT / "bench" / "capacity.md", "the estimate")
    args = p.parse_args(argv)
    rates = {"eager": GPU_EAGER}
    if args.device_run is not None:
        rates |= device_run_rates(args.device_run)
    sizes = {n: rows_of(n, args.d4rl_dir)[0] for n in D4RL_ROWS}
    tr = trials(sizes)
    results = [estimate(sc, trials(sizes, sc.population), sum(sizes.values())) for sc in scenarios(rates)]
    text = render(results, rates, tr, args.d4rl_dir)
    if args.device_run is not None:
        text += model_check(rates, measured_job(args.device_run))
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
