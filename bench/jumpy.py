"""How well does a jumpy IDM (a_t = I(s_t, s_{t+k})) recover the action as k grows?

    python bench/jumpy.py [--datasets sim-hopper-mixed-v0,sim-halfcheetah-mixed-v0] [--jumps 1,2,4,8]

Test episodes: --test-fraction of each dataset's episodes (split seed --test-seed), held out before
training; each model trains on the rest (its trainer splits validation episodes from those) with
TrainConfig(jump=k), and is scored on the test episodes' own k-step pairs (pipeline.data.transitions
.jump_pairs). Baseline: the training episodes' mean action. Writes --out (Markdown) with the command and
the machine.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, device_note, load_note, machine, md_table, parser  # noqa: E402


def one_dataset(name: str, args, workdir: Path) -> list[dict]:
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.data.transitions import jump_pairs
    from pipeline.quality.recipe import subset
    from pipeline.training.config import TrainConfig
    from pipeline.training.split import split_indices
    from pipeline.training.trainer import train

    t = load_transitions(name)
    dev_rows, test_rows = split_indices(t, "episodes", args.test_fraction, args.test_seed)
    dev = subset(t, dev_rows, f"bench-dev-{args.test_seed}")
    test = subset(t, test_rows, f"bench-test-{args.test_seed}")
    rows = []
    for k in (int(x) for x in args.jumps.split(",")):
        config = TrainConfig(max_epochs=args.max_epochs, seed=0, jump=k, threads=os.cpu_count())
        started = time.perf_counter()
        result = train(dev, config, workdir / f"{name}-k{k}", figures=False)
        train_s = time.perf_counter() - started
        model = invdyn.read_model_dir(result.model_dir)
        pairs, dev_pairs = jump_pairs(test, k), jump_pairs(dev, k)
        pred = model.predict(pairs.obs, pairs.next_obs).astype(np.float64)
        act = pairs.act.astype(np.float64)
        mse = float(((pred - act) ** 2).mean())
        base = float(((act - dev_pairs.act.astype(np.float64).mean(0)) ** 2).mean())
        rows.append(
            {
                "dataset": name,
                "k": k,
                "test_pairs": len(pairs),
                "mse": mse,
                "baseline": base,
                "epochs": result.metrics["epochs"],
                "train_s": train_s,
            }
        )
        print(table(rows)[-1], flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    head = ["dataset", "k", "test pairs", "action MSE", "mean-action MSE", "MSE / mean-action", "epochs"]
    return md_table(
        [*head, "train s"],
        [
            [r["dataset"], r["k"], r["test_pairs"], f"{r['mse']:.5f}", f"{r['baseline']:.5f}"]
            + [f"{r['mse'] / r['baseline']:.3f}", r["epochs"], f"{r['train_s']:.0f}"]
            for r in rows
        ],
    )


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--datasets", default="sim-hopper-mixed-v0,sim-halfcheetah-mixed-v0")
    p.add_argument("--jumps", default="1,2,4,8")
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--test-seed", type=int, default=1234)
    add_out(p, ROOT / "bench" / "jumpy.md")
    args = p.parse_args(argv)
    import torch

    where = machine(device_note("cuda" if torch.cuda.is_available() else "cpu") + ", " + load_note())
    rows = []
    with tempfile.TemporaryDirectory(prefix="invdyn-jumpy-") as tmp:
        for name in args.datasets.split(","):
            rows += one_dataset(name, args, Path(tmp))
    command = "python bench/jumpy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [
        "# Jumpy IDMs: action error as the jump k grows (issue item 4)",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        f"Machine: {where}. {args.max_epochs} epochs, the trainer's other defaults, seed 0.",
        f"Test episodes: {args.test_fraction:.0%} of each dataset's episodes (seed {args.test_seed}), held "
        "out before training; every model is scored on the test episodes' own k-step pairs (none crosses "
        "an episode end). Baseline: the training episodes' mean action.",
        "",
        *table(rows),
        "",
    ]
    if args.out == "-":
        print("\n".join(text))
    else:
        Path(args.out).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
