"""Which training settings beat CleanDiffuser's IDM recipe? Held-out MSE and 32-step MuJoCo tracking drift.

    python bench/quality_vs_recipe.py                       # sim suite, recipe vs the default candidates
    python bench/quality_vs_recipe.py --datasets sim-hopper-mixed-v0 --candidates recipe,res_mlp
    python bench/quality_vs_recipe.py --split-seeds 0,1,2    # repeated on 3 test splits: OUT/splits.md

Protocol (the same for every candidate, so the comparison is fair): per dataset, 20% of the episodes
(seeded) are set aside as the test set and never touched in training; each candidate trains on the rest
with its own validation split and stopping rule (the recipe: random 80/20 of transitions, patience 3,
last weights), and is scored on the test episodes: action MSE, and the closed-loop drift of MuJoCo
following the recorded trajectory for --horizon steps (pipeline.quality.evaluate). Writes OUT/results.json,
OUT/table.md, and a report (OUT/report/report.md + plots) with the best candidate as champion. With
--split-seeds, the whole comparison runs once per test-split seed (OUT/split-<seed>/) and OUT/splits.md gives
mean ± std over the seeds (pipeline.training.repeats) of each candidate's numbers and of its ratios to the
recipe. Candidates train with test_fraction 0: the bench's own test episodes are their test part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads, load_note, machine, md_table, measured_on, parser  # noqa: E402

from pipeline.quality.recipe import RECIPE  # noqa: E402

#: the recipe's fixes in one: honest episode split, best weights, no dropout, AdamW + cosine over 60 epochs
LONG = {
    "split": "episodes",
    "keep": "best",
    "dropout": 0.0,
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "lr": 1e-3,
    "schedule": "cosine",
    "max_epochs": 60,
    "patience": 60,
}
#: candidates: overrides of the recipe (what the field suggests, one idea each, then combined); fp32
#: unless named *_bf16 (the recipe's own precision: CleanDiffuser trains in fp32)
CANDIDATES = {
    "recipe": {},
    "recipe_bf16": {"precision": "bf16"},
    "ep_split_best": {"split": "episodes", "keep": "best", "patience": 10},
    "no_dropout": {"split": "episodes", "keep": "best", "patience": 10, "dropout": 0.0},
    "huber": {"split": "episodes", "keep": "best", "patience": 10, "loss": "huber"},
    "wide": {"split": "episodes", "keep": "best", "patience": 10, "dropout": 0.0, "hidden_dim": 1024},
    "adamw_cosine": LONG,
    "res_mlp": {**LONG, "arch": "res_mlp"},
    "res_mlp_bf16": {**LONG, "arch": "res_mlp", "precision": "bf16"},
    "long_bf16": {**LONG, "precision": "bf16"},
    "long_p10_bf16": {**LONG, "precision": "bf16", "patience": 10},
    "defaults": None,  # TrainConfig() as it ships: what `pipeline.training.cli` and `pretrain_all` use
}
DEFAULT_CANDIDATES = "recipe,adamw_cosine,res_mlp"
SIM_SUITE = "sim-halfcheetah-mixed-v0,sim-hopper-mixed-v0,sim-walker2d-mixed-v0"


def run(args) -> list[dict]:
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.quality.evaluate import evaluate
    from pipeline.quality.recipe import subset
    from pipeline.training.config import TrainConfig
    from pipeline.training.split import split_indices
    from pipeline.training.trainer import train

    out = Path(args.out)
    done = {}  # --resume: runs already in OUT/results.json whose model directory is still there
    if args.resume and (out / "results.json").is_file():
        done = {(r["dataset"], r["candidate"]): r for r in json.loads((out / "results.json").read_text())}
        done = {k: r for k, r in done.items() if Path(r["model_dir"]).is_dir()}
    rows = []
    for name in args.datasets.split(","):
        t = load_transitions(name)
        dev, test = split_indices(t, "episodes", 0.2, args.test_seed)
        dev_set = subset(t, dev, f"bench-dev-{args.test_seed}")
        held = f"bench test episodes (seed {args.test_seed})"
        for cand in args.candidates.split(","):
            if (name, cand) in done:
                row = done[(name, cand)]
                if args.reevaluate:  # same weights, the current evaluation settings
                    row["eval"] = evaluate(
                        invdyn.read_model_dir(row["model_dir"]),
                        t,
                        rows=(dev, test, held),
                        horizon=args.horizon,
                        tracking_starts=args.starts,
                        one_step_samples=args.samples,
                    )
                rows.append(row)
                _print(row, args.horizon, f"(trained earlier, {out / 'results.json'})")
                continue
            base = {} if CANDIDATES[cand] is None else {**RECIPE, **CANDIDATES[cand]}
            config = {**base, "seed": args.seed, "threads": args.threads, "test_fraction": 0.0}
            if args.max_epochs:
                config["max_epochs"] = min(config.get("max_epochs", args.max_epochs), args.max_epochs)
            started = time.perf_counter()
            result = train(dev_set, TrainConfig(**config), out / "models" / name / cand, dataset_name=name)
            wall = time.perf_counter() - started
            model = invdyn.read_model_dir(result.model_dir)
            ev = evaluate(
                model,
                t,
                rows=(dev, test, held),
                horizon=args.horizon,
                tracking_starts=args.starts,
                one_step_samples=args.samples,
            )
            row = {
                "dataset": name,
                "candidate": cand,
                "config": config,
                "train_wall_s": wall,
                "epochs": result.metrics["epochs"],
                "model_dir": str(result.model_dir),
                "eval": ev,
                "machine": args.machine,
            }
            rows.append(row)
            _print(row, args.horizon, f"{wall:6.0f}s")
            _save(out, done, rows)
    return _save(out, done, rows)


def _print(row: dict, horizon: int, note: str) -> None:
    e = row["eval"]
    print(
        f"{row['dataset']:28} {row['candidate']:14} test MSE {e['heldout_mse']:.5f}  drift@{horizon} "
        f"{e['tracking_drift']:.4f}  one-step {e['one_step_error']:.4f}  epochs {row['epochs']:3d}  {note}",
        flush=True,
    )


def _save(out: Path, done: dict, rows: list[dict]) -> list[dict]:
    """OUT/results.json: this run's rows plus earlier ones it did not redo, recipe first per dataset."""
    ran = {(r["dataset"], r["candidate"]) for r in rows}
    every = [r for k, r in done.items() if k not in ran] + rows
    every.sort(key=lambda r: (r["dataset"], r["candidate"] != "recipe"))
    (out / "results.json").write_text(json.dumps(every, indent=2, default=str))
    return every


def table(rows: list[dict], horizon: int) -> str:
    """Markdown: every candidate's test MSE and drift, and both as a ratio to the recipe's on that dataset."""
    recipe = {r["dataset"]: r["eval"] for r in rows if r["candidate"] == "recipe"}
    cells = []
    for r in rows:
        e, base = r["eval"], recipe.get(r["dataset"], {})

        def ratio(key, e=e, base=base):
            return f"{e[key] / base[key]:.3f}" if base.get(key) and e.get(key) is not None else "n/a"

        cells.append(
            [r["dataset"], r["candidate"], f"{e['heldout_mse']:.5f}", ratio("heldout_mse")]
            + [f"{e['tracking_drift']:.4f}", ratio("tracking_drift"), f"{e['one_step_error']:.4f}"]
            + [r["epochs"], f"{r['train_wall_s']:.0f}"]
        )
    head = ["dataset", "candidate", "test MSE", "/ recipe", f"drift@{horizon}", "/ recipe", "one-step"]
    lines = [f"Machine: {measured_on(rows)}.", "", *md_table([*head, "epochs", "train s"], cells), ""]
    baselines = {r["dataset"]: r["eval"] for r in rows}
    lines += md_table(
        ["dataset", "mean-action MSE", "mean-action drift", "floor drift"],
        [
            [d, f"{e['baseline_mse']:.4f}", f"{e['tracking_baseline']:.4f}", f"{e['tracking_floor']:.2g}"]
            for d, e in baselines.items()
        ],
    )
    return "\n".join(lines) + "\n"


def champion_report(rows: list[dict], out: Path, horizon: int) -> None:
    """A pipeline.quality.report with, per dataset, the candidate best on both metrics (sum of ratios) vs
    the recipe."""
    from pipeline.quality.report import write_report

    entries = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        recipe = next((r for r in mine if r["candidate"] == "recipe"), None)
        others = [r for r in mine if r["candidate"] != "recipe"] or mine

        def score(r, recipe=recipe):
            if recipe is None:
                return r["eval"]["heldout_mse"]
            return sum(r["eval"][k] / recipe["eval"][k] for k in ("heldout_mse", "tracking_drift"))

        best = min(others, key=score)
        curve = json.loads((Path(best["model_dir"]) / "params.json").read_text()).get("learning_curve", [])
        entry = {
            "dataset": name,
            "champion": best["eval"],
            "champion_dir": best["model_dir"],
            "champion_curve": curve,
            "champion_config": {"candidate": best["candidate"], **best["config"]},
            "recipe": recipe["eval"] if recipe else None,
        }
        if recipe:
            entry["recipe_curve"] = json.loads((Path(recipe["model_dir"]) / "params.json").read_text()).get(
                "learning_curve", []
            )
        entries.append(entry)
    write_report(entries, out / "report", horizon)


def over_splits(rows: list[dict], horizon: int) -> str:
    """Markdown: per dataset and candidate, mean ± std over the split seeds of test MSE, drift and one-step
    error, and of the per-seed ratios to the recipe."""
    from pipeline.training.repeats import fmt_interval, interval

    recipe = {(r["dataset"], r["split_seed"]): r["eval"] for r in rows if r["candidate"] == "recipe"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["candidate"]), []).append(r)
    lines = [f"Machine: {measured_on(rows)}.", ""]
    rows_out = []
    for (dataset, cand), rs in groups.items():

        def ratio(key, rs=rs):
            base = [recipe.get((r["dataset"], r["split_seed"]), {}).get(key) for r in rs]
            return interval(r["eval"][key] / b if b else None for r, b in zip(rs, base, strict=True))

        cells = [
            fmt_interval(interval(r["eval"]["heldout_mse"] for r in rs)),
            fmt_interval(ratio("heldout_mse"), ".3g"),
            fmt_interval(interval(r["eval"]["tracking_drift"] for r in rs)),
            fmt_interval(ratio("tracking_drift"), ".3g"),
            fmt_interval(interval(r["eval"]["one_step_error"] for r in rs)),
        ]
        rows_out.append([dataset, cand, len(rs), *cells])
    head = ["dataset", "candidate", "splits", "test MSE", "/ recipe", f"drift@{horizon}", "/ recipe"]
    lines += md_table([*head, "one-step"], rows_out)
    return "\n".join(lines) + "\n"


def run_split_seeds(args) -> str:
    """The comparison once per test-split seed (OUT/split-<seed>/), then OUT/splits.md over the seeds."""
    from pipeline.training.repeats import parse_seeds

    every = []
    for seed in parse_seeds(args.split_seeds):
        one = argparse.Namespace(
            **{**vars(args), "test_seed": seed, "out": str(Path(args.out) / f"split-{seed}")}
        )
        Path(one.out).mkdir(parents=True, exist_ok=True)
        rows = run(one)
        (Path(one.out) / "table.md").write_text(table(rows, args.horizon))
        every += [{**r, "split_seed": seed} for r in rows]
    text = over_splits(every, args.horizon)
    (Path(args.out) / "splits.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--datasets", default=SIM_SUITE)
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES, help=f"comma list of {', '.join(CANDIDATES)}")
    ap.add_argument("--out", default="runs/bench-quality", help="folder of its results, tables and report")
    ap.add_argument("--horizon", type=int, default=32)
    ap.add_argument("--starts", type=int, default=400, help="tracking starts (128 leaves ~10%% noise)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--max-epochs", type=int, default=None, help="cap every candidate's epochs (quick looks)")
    ap.add_argument("--resume", action="store_true", help="reuse runs already in OUT/results.json")
    ap.add_argument("--reevaluate", action="store_true", help="with --resume: evaluate reused models again")
    ap.add_argument("--seed", type=int, default=0)
    add_threads(ap)  # 1 on a shared, busy machine
    ap.add_argument("--test-seed", type=int, default=1234)
    ap.add_argument("--split-seeds", default=None, help="repeat on these test-split seeds (OUT/splits.md)")
    args = ap.parse_args(argv)
    args.machine = machine("CPU only, " + load_note())  # recorded with every run measured now
    unknown = [c for c in args.candidates.split(",") if c not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.split_seeds:
        print(run_split_seeds(args))
        print(f"written: {args.out}/splits.md, {args.out}/split-<seed>/")
        return 0
    rows = run(args)
    text = table(rows, args.horizon)
    (Path(args.out) / "table.md").write_text(text)
    champion_report(rows, Path(args.out), args.horizon)
    print()
    print(text)
    print(f"written: {args.out}/table.md, {args.out}/results.json, {args.out}/report/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
