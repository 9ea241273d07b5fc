"""Is the walker2d MSE target (<= 0.8x the recipe's) reachable on the 50k-transition sim set?

    python bench/studies/quality_limits.py                      # walker2d, ~6 min on 2 cores
    python bench/studies/quality_limits.py --datasets sim-halfcheetah-mixed-v0 --scaling-only --ensemble 1
    python bench/studies/quality_limits.py --config '{"arch": "res_mlp"}' --scaling-only --ensemble 5 \
        --variants '{"hidden 1024": {"hidden_dim": 1024}}'

Same protocol as bench/quality_vs_recipe.py (20% of the episodes, seed 1234, are the test set; every model
trains on the rest). Four questions, each answered by test-episode action MSE:
1. data: the config trained on 25%, 50% and 100% of the training episodes. The slope in log-log gives the
   MSE change per doubling of data, and so how much more data the target would need at that rate;
2. regularization / longer training: dropout 0.2 and 0.3, weight decay 0.1, 120 epochs;
3. ensembles: the mean prediction of K seeds;
4. information: the config given the simulator's true (unclipped) joint velocities next to s and s'. The
   dataset does not have them; Gymnasium clips walker2d's velocities at +-10. This shows how much of the error
   comes from what the observation hides.
Writes OUT/results.json and OUT/limits.md; bench/studies/quality_limits.md holds the recorded runs and their
reading.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
from common import add_threads, load_note, machine, md_table, measured_on, parser  # noqa: E402

from pipeline.quality.recipe import RECIPE  # noqa: E402


def _with_true_velocities(t):
    """obs / next_obs extended with the simulator's qvel at s and at s' (the next row's, same episode);
    returns (transitions, rows whose successor row is their s')."""
    ok = np.zeros(len(t), bool)
    ok[:-1] = (t.episode[1:] == t.episode[:-1]) & np.all(t.obs[1:] == t.next_obs[:-1], axis=1)
    qvel = t.qvel.astype(np.float32)
    next_qvel = np.zeros_like(qvel)
    next_qvel[:-1] = qvel[1:]
    obs, next_obs = np.concatenate([t.obs, qvel], 1), np.concatenate([t.next_obs, next_qvel], 1)
    stats = {**t.stats, "obs_dim": obs.shape[1]}
    return dataclasses.replace(
        t, obs=obs, next_obs=next_obs, qpos=None, qvel=None, stats=stats
    ), np.flatnonzero(ok)


def run(args) -> list[dict]:
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.quality.recipe import subset
    from pipeline.training.config import TrainConfig
    from pipeline.training.split import split_indices
    from pipeline.training.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"threads": args.threads, **json.loads(args.config)}
    rows = []

    def fit(t, dev, test, label, config, seed=0):
        started = time.perf_counter()
        result = train(
            subset(t, dev, f"limits-{label}"),
            TrainConfig(**{**config, "seed": seed}),
            out / "models" / t.name / f"{label}-s{seed}",
            dataset_name=t.name,
        )
        pred = np.asarray(invdyn.read_model_dir(result.model_dir).predict(t.obs[test], t.next_obs[test]))
        row = {
            "dataset": t.name,
            "label": label,
            "seed": seed,
            "train_transitions": int(len(dev)),
            "test_mse": float(((pred - t.act[test]) ** 2).mean()),
            "epochs": result.metrics["epochs"],
            "wall_s": time.perf_counter() - started,
            "machine": args.machine,
        }
        print(
            f"{t.name:26} {label:22} seed {seed}  {len(dev):6d} rows  test MSE {row['test_mse']:.5f}  "
            f"{row['wall_s']:4.0f} s",
            flush=True,
        )
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        return row, pred

    for name in args.datasets.split(","):
        t = load_transitions(name)
        dev, test = (np.asarray(r) for r in split_indices(t, "episodes", 0.2, args.test_seed))
        fit(t, dev, test, "recipe", {**RECIPE, "threads": args.threads})
        episodes = np.unique(t.episode[dev])
        np.random.default_rng(0).shuffle(episodes)
        for frac in (0.25, 0.5):
            keep = np.isin(t.episode[dev], episodes[: math.ceil(len(episodes) * frac)])
            fit(t, dev[keep], test, f"config, {frac:.0%} data", base)
        preds = [fit(t, dev, test, "config", base, seed)[1] for seed in range(args.ensemble)]
        if len(preds) > 1:
            ens = float(((np.mean(preds, 0) - t.act[test]) ** 2).mean())
            rows.append(
                {
                    "dataset": name,
                    "label": f"ensemble of {args.ensemble} (config)",
                    "seed": None,
                    "train_transitions": int(len(dev)),
                    "test_mse": ens,
                    "epochs": None,
                    "wall_s": None,
                    "machine": args.machine,
                }
            )
        for label, over in json.loads(args.variants).items():
            fit(t, dev, test, label, {**base, **over})
        if args.scaling_only:
            continue
        for label, over in (
            ("dropout 0.2", {"dropout": 0.2}),
            ("dropout 0.3", {"dropout": 0.3}),
            ("weight decay 0.1", {"weight_decay": 0.1}),
            ("120 epochs", {"max_epochs": 120}),
        ):
            fit(t, dev, test, label, {**base, **over})
        if t.qvel is not None:
            aug, ok = _with_true_velocities(t)
            fit(aug, np.intersect1d(dev, ok), np.intersect1d(test, ok), "config + true velocities", base)
            fit(t, np.intersect1d(dev, ok), np.intersect1d(test, ok), "config, same rows", base)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: each run's test MSE against the recipe's, and the data-scaling extrapolation."""
    cells, notes = [], []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        recipe = next(r["test_mse"] for r in mine if r["label"] == "recipe")
        for r in mine:
            seed = f" (seed {r['seed']})" if r["seed"] else ""
            cells.append(
                [name, f"{r['label']}{seed}", r["train_transitions"], f"{r['test_mse']:.5f}"]
                + [f"{r['test_mse'] / recipe:.3f}"]
            )
        full = next(r for r in mine if r["label"] == "config" and r["seed"] == 0)
        scaling = [r for r in mine if r["label"].endswith("% data")] + [full]
        n = np.log2([r["train_transitions"] for r in scaling])
        slope = float(np.polyfit(n, np.log2([r["test_mse"] for r in scaling]), 1)[0])  # log2 MSE per doubling
        full = full["test_mse"]
        doublings = math.log2(0.8 * recipe / full) / slope if slope < 0 else math.inf
        notes.append(
            f"- {name}: test MSE x{2**slope:.3f} per doubling of the training data; 0.8x the recipe "
            f"({0.8 * recipe:.5f}) is {doublings:.1f} doublings away at that rate, i.e. about "
            f"{2**doublings:.1f}x the data."
        )
    lines = md_table(["dataset", "run", "train rows", "test MSE", "/ recipe"], cells)
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--datasets", default="sim-walker2d-mixed-v0")
    ap.add_argument(
        "--config", default="{}", help="TrainConfig overrides (JSON) for the runs; {} = the defaults"
    )
    ap.add_argument("--ensemble", type=int, default=3, help="seeds averaged in the ensemble row")
    ap.add_argument(
        "--scaling-only",
        action="store_true",
        help="only the recipe, the data fractions, the ensemble and --variants",
    )
    ap.add_argument(
        "--variants",
        default="{}",
        metavar="JSON",
        help='{"label": {TrainConfig overrides on top of --config}, ...}: one run each, seed 0',
    )
    add_threads(ap, 2)
    ap.add_argument("--test-seed", type=int, default=1234)
    ap.add_argument("--out", default="runs/quality-limits")
    args = ap.parse_args(argv)
    args.machine = machine(f"CPU only, {args.threads} torch threads, {load_note()}")
    rows = run(args)
    md = f"Machine: {measured_on(rows)}.\n\n" + table(rows)
    (Path(args.out) / "limits.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
