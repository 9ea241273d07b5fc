"""Ensembles on the sim suite: does the spread predict the error, does the feasibility score tell real
transitions from infeasible ones, and how much does the members' mean lower the test MSE?

    python bench/ensembles.py --workdir /tmp/invdyn-ensembles          # train 5 members per dataset, measure
    python bench/ensembles.py --workdir /tmp/invdyn-ensembles --reuse  # measure the ensembles already there

Test episodes: 15% of each dataset's episodes (split seed --test-seed), held out before training; the
members (seeds 0..K-1) train on the rest, where the trainer splits off its own validation episodes. Writes
--out (Markdown) with the command and the machine, and each ensemble's card section "Uncertainty".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, device_note, load_note, machine, md_table, parser  # noqa: E402

DATASETS = ("sim-hopper-mixed-v0", "sim-halfcheetah-mixed-v0", "sim-walker2d-mixed-v0")


HOW = [
    "- member MSE: the test action MSE of each member, averaged over the members; ensemble MSE: that of "
    "their mean; ratio = ensemble / member.",
    "- spread-error Spearman: per test pair, the members' std (mean over action dimensions) against the "
    "ensemble mean's squared error (mean over action dimensions).",
    "- uncertainty-error Spearman: the same for `model.uncertainty`, sqrt(spread² + the error model's "
    "variance); the error model (an MLP from the pair, the spread and the mean action to the log squared "
    "error) is fitted on member 0's validation pairs, which no member trained on.",
    "- AUROC: `model.feasibility` of the real test pairs (s, s') against (s, s'') with s'' the next state of "
    "another time step of the same episode (chosen at random), and against (s, s' + noise), noise = "
    "1 / 5 / 20 % of each state dimension's std times N(0, 1); 0.5 is chance. The score: minus the "
    "Mahalanobis distance (per state dimension) of s' from a linear one-step model s'_n ~ [s_n, a, 1] W "
    "(least squares on member 0's training pairs, residual covariance from them) driven by the ensemble's "
    "mean action a. spread-only: minus the members' spread (each action dimension divided by its median on "
    "member 0's validation pairs), the score without the one-step model.",
]


def one_dataset(name: str, args) -> dict:
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.quality.recipe import subset
    from pipeline.training.config import TrainConfig
    from pipeline.training.ensemble import attach_uncertainty, calibrate, measure, train_ensemble
    from pipeline.training.split import split_from_training, split_indices

    t = load_transitions(name)
    dev, test = split_indices(t, "episodes", args.test_fraction, args.test_seed)
    out = Path(args.workdir) / invdyn.settings.dataset_model_name(name)
    started = time.perf_counter()
    dev_set = subset(t, dev, f"bench-dev-{args.test_seed}")
    if not (args.reuse and out.is_dir()):
        config = TrainConfig(max_epochs=args.max_epochs, hidden_dim=args.hidden_dim, seed=0)
        train_ensemble(dev_set, config, out, args.members, dataset_name=name)
    elif args.recalibrate:  # an ensemble written before its calibration changed (e.g. no error model)
        training = invdyn.read_model_dir(out).params["training"]
        if training.get("split_seed") is None:
            raise SystemExit(f"{out}: its members do not share one split; train it again (without --reuse)")
        train_rows, val_rows, _ = split_from_training(dev_set, training)
        calibrate(out, dev_set, train_rows, val_rows)
    train_s = time.perf_counter() - started
    model = invdyn.read_model_dir(out)
    stats = measure(model, t, test, seed=args.test_seed)
    protocol = (
        f"Measured by bench/ensembles.py on {len(test)} transitions of held-out test episodes "
        f"({args.test_fraction:.0%} of the episodes, split seed {args.test_seed}), never trained on."
    )
    attach_uncertainty(out, stats, protocol)
    return {"dataset": name, "train_s": train_s, **stats}


#: the table's columns after the dataset: (header, key in a measured row, format)
COLUMNS = (
    ("member MSE", "member_mse", ".5f"),
    ("ensemble MSE", "ensemble_mse", ".5f"),
    ("ratio", "mse_ratio", ".3f"),
    ("spread-error Spearman", "spread_error_spearman", ".3f"),
    ("uncertainty-error Spearman", "uncertainty_error_spearman", ".3f"),
    ("AUROC other step", "auroc_other_step", ".3f"),
    ("AUROC 1%", "auroc_noise_1pct", ".3f"),
    ("AUROC 5%", "auroc_noise_5pct", ".3f"),
    ("AUROC 20%", "auroc_noise_20pct", ".3f"),
    ("spread-only AUROC 5%", "auroc_spread_only_noise_5pct", ".3f"),
)


def table(rows: list[dict]) -> list[str]:
    return md_table(
        ["dataset", *(c[0] for c in COLUMNS)],
        [[r["dataset"], *(format(r[key], spec) for _, key, spec in COLUMNS)] for r in rows],
    )


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target: met on every dataset, or where it is missed."""
    checks = [
        ("feasibility AUROC >= 0.95 at 5% state noise", "auroc_noise_5pct", lambda v: v >= 0.95),
        ("spread-error Spearman >= 0.5 (members' spread alone)", "spread_error_spearman", lambda v: v >= 0.5),
        (
            "uncertainty-error Spearman >= 0.5 (spread + error model)",
            "uncertainty_error_spearman",
            lambda v: v >= 0.5,
        ),
        ("ensemble test MSE <= 0.9x a member's", "mse_ratio", lambda v: v <= 0.9),
    ]
    lines = []
    for text, key, ok in checks:
        missed = [f"{r['dataset']} ({r[key]:.3f})" for r in rows if not ok(r[key])]
        lines.append(f"- {text}: " + (f"missed on {', '.join(missed)}" if missed else "met on every dataset"))
    return lines


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--workdir", default="/tmp/invdyn-ensembles", help="where the ensembles are written")
    p.add_argument("--reuse", action="store_true", help="measure the ensembles already in --workdir")
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="with --reuse: fit the calibration (one-step model, spread reference, error model) again",
    )
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--test-seed", type=int, default=1234)
    add_out(p, ROOT / "bench" / "ensembles.md")
    args = p.parse_args(argv)
    import torch

    where = machine(device_note("cuda" if torch.cuda.is_available() else "cpu") + ", " + load_note())
    rows = []
    for name in args.datasets.split(","):
        rows.append(one_dataset(name, args))
        print(table(rows)[-1], f"(trained in {rows[-1]['train_s']:.0f} s)", flush=True)
    command = "python bench/ensembles.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [
        "# Ensembles: spread, feasibility and the members' mean (issue item 3)",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        *(
            [
                "The ensembles were trained by the same command without --reuse; this run "
                + ("calibrated and measured them." if args.recalibrate else "measured them."),
                "",
            ]
            if args.reuse
            else []
        ),
        f"Machine: {where}. {args.members} members per dataset (seeds 0..{args.members - 1}), "
        f"{args.max_epochs} epochs, hidden {args.hidden_dim}, the trainer's other defaults.",
        f"Test episodes: {args.test_fraction:.0%} of each dataset's episodes (seed {args.test_seed}), held "
        "out before training; the members share one split of the rest into training and validation "
        "episodes (split seed 0).",
        "",
        *table(rows),
        "",
        *HOW,
        "",
        "Targets:",
        "",
        *verdicts(rows),
        "",
    ]
    if args.out == "-":
        print("\n".join(text))
    else:
        Path(args.out).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
