"""A population (K configs trained as one stacked model) vs the same K configs trained one after another.

    python bench/population.py --device cpu --members 1,9 --epochs 3 --out bench/population.md
    python bench/population.py --device cuda --members 1,9,27 --epochs 5 --out OUT/population.md

For each K the configs are a grid lr x weight_decay x seed (K = 1: the defaults; 9: 3 lr x 3 weight
decays; 27: x 3 seeds), all on one split (`split_seed` fixed, so seeds change only the initial weights and
the batches and every config lands in one group). Both sides train the same configs on the same data with
the same threads and write the same model directories (without the card's figures). Reported:
aggregate training samples/s (samples of every member / time inside training steps, validation
excluded), wall time of the whole call (preparing, training, validating, writing), their ratios, the
ratio of the process's CPU time (separate / population: the work each side did, which a shared
machine's load inflates less than the wall time), and whether both sides pick the same best config by
`heldout_mse` (and how far apart their MSEs are).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out, device_note, load_note, machine, md_table, parser  # noqa: E402

from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.population import train_population  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402

LRS = (1e-3, 3e-4, 3e-3)
WEIGHT_DECAYS = (1e-4, 1e-2, 0.0)
SEEDS = (0, 1, 2)


def grid(k: int, base: dict) -> list[TrainConfig]:
    """K configs: the first K of lr x weight_decay x seed (seed slowest, so 9 = one seed's 3 x 3)."""
    points = [(lr, wd, s) for s in SEEDS for lr in LRS for wd in WEIGHT_DECAYS]
    if k > len(points):
        raise SystemExit(f"--members {k}: at most {len(points)} (3 lr x 3 weight decays x 3 seeds)")
    return [TrainConfig(**{**base, "lr": lr, "weight_decay": wd, "seed": s}) for lr, wd, s in points[:k]]


def run_population(data, configs, out: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    results = train_population(data, configs, [out / f"p{i}" for i in range(len(configs))], figures=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = sum(r.metrics["samples_per_s"] * r.metrics["train_time_s"] for r in results)
    train_time = max(r.metrics["train_time_s"] for r in results)  # members share one loop
    return {"wall": wall, "cpu": cpu, "train": train_time, "samples": samples, "mse": _mse(results)}


def run_separate(data, configs, out: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    results = [train(data, c, out / f"s{i}", figures=False) for i, c in enumerate(configs)]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = sum(r.metrics["samples_per_s"] * r.metrics["train_time_s"] for r in results)
    train_time = sum(r.metrics["train_time_s"] for r in results)
    return {"wall": wall, "cpu": cpu, "train": train_time, "samples": samples, "mse": _mse(results)}


def measure(data, configs, rounds: int) -> tuple[dict, dict]:
    """Both sides `rounds` times, alternating which goes first (a shared machine's load drifts); the
    median of each number, and the first round's heldout MSEs (every round trains the same)."""
    runs = {"pop": [], "sep": []}
    for r in range(rounds):
        order = ("pop", "sep") if r % 2 == 0 else ("sep", "pop")
        for side in order:
            with tempfile.TemporaryDirectory() as tmp:
                run = run_population if side == "pop" else run_separate
                runs[side].append(run(data, configs, Path(tmp)))
    return tuple(_median(runs[side]) for side in ("pop", "sep"))


def _median(runs: list[dict]) -> dict:
    out = {k: statistics.median(run[k] for run in runs) for k in ("wall", "cpu", "train")}
    out["rate"] = statistics.median(run["samples"] / run["train"] for run in runs)
    return {**out, "mse": runs[0]["mse"]}


def _mse(results) -> list[float]:
    return [r.metrics["heldout_mse"] for r in results]


HEADER = ["K", "population samples/s", "separate samples/s", "ratio", "population wall s", "separate wall s"]
HEADER += ["wall ratio", "CPU-time ratio", "same best config (separate's best)", "max rel. heldout_mse gap"]


def row(k: int, pop: dict, sep: dict, configs) -> str:
    pop_rate, sep_rate = pop["rate"], sep["rate"]
    best_pop = min(range(k), key=lambda i: pop["mse"][i])
    best_sep = min(range(k), key=lambda i: sep["mse"][i])
    c = configs[best_sep]
    gap = max(abs(a - b) / b for a, b in zip(pop["mse"], sep["mse"], strict=True))
    same = "yes" if best_pop == best_sep else f"NO (population: #{best_pop})"
    cells = [k, f"{pop_rate:,.0f}", f"{sep_rate:,.0f}", f"{pop_rate / sep_rate:.2f}", f"{pop['wall']:.1f}"]
    cells += [f"{sep['wall']:.1f}", f"{sep['wall'] / pop['wall']:.2f}", f"{sep['cpu'] / pop['cpu']:.2f}"]
    cells += [f"{same}: lr {c.lr:g}, wd {c.weight_decay:g}, seed {c.seed}", f"{gap:.1e}"]
    return md_table(HEADER, [cells])[-1]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--dataset", default="sim-halfcheetah-mixed-v0")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--members", default="1,9,27", help="comma-separated K values")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--step", choices=("auto", "eager", "graph"), default="auto")
    p.add_argument("--rounds", type=int, default=1, help="repeat both sides, alternating; medians")
    add_out(p, "-", "also write the Markdown table to this file")
    args = p.parse_args(argv)
    where = machine(device_note(args.device) + ", " + load_note())
    from pipeline.data.sources import load_transitions

    data = load_transitions(args.dataset)
    base = {
        "device": args.device,
        "max_epochs": args.epochs,
        "hidden_dim": args.hidden,
        "step": args.step,
        "split_seed": 0,
    }
    lines = [
        f"`python bench/population.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{where}; {data.name} ({len(data):,} transitions), hidden {args.hidden}, batch 512, "
        f"{args.epochs} epochs, step {args.step}, precision auto.",
        "",
        *md_table(HEADER, []),
    ]
    print("\n".join(lines), flush=True)
    for k in (int(x) for x in args.members.split(",")):
        configs = grid(k, base)
        pop, sep = measure(data, configs, args.rounds)
        lines.append(row(k, pop, sep, configs))
        print(lines[-1], flush=True)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
