"""Train one IDM without Ray: `python -m pipeline.train --dataset NAME_OR_PATH --out DIR [options]`.

Writes the model directory (invdyn format) at DIR, prints one progress line per evaluation and a
summary table at the end. Every TrainConfig field is a flag (`--hidden-dim`, `--precision`, ...).
`--split-seeds 0,1,2` retrains on each split seed into DIR/split-<seed>/ and writes DIR/splits.json and
DIR/splits.md (mean ± std, min, max over the splits; pipeline.training.repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from invdyn._files import check_writable
from invdyn.errors import InvdynError
from invdyn.model_dir import PARAMS_FILE
from invdyn.settings import is_valid_name
from pipeline.dataclass_cli import add_options, from_namespace
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.population import SEARCH_JSON
from pipeline.training.repeats import SPLITS_JSON, parse_seeds, splits_table, train_split_seeds
from pipeline.training.trainer import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset", required=True, help="catalog name, sim-* name, minari:<id> or .hdf5/.parquet path"
    )
    p.add_argument("--out", required=True, help="model directory to write (replaced atomically)")
    p.add_argument("--name", default=None, help="model name in params.json (default: the dataset's name)")
    p.add_argument("--download", action="store_true", help="download a missing D4RL file")
    p.add_argument("--quiet", action="store_true", help="no per-evaluation progress lines")
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="K",
        help="train K members (seeds seed .. seed+K-1) into one ensemble directory (default 1: one model)",
    )
    p.add_argument(
        "--split-seeds",
        default=None,
        metavar="S,S,...",
        help="retrain on each of these split seeds (DIR/split-<seed>/), summarize over them (DIR/splits.md)",
    )
    p.add_argument(
        "--search-space",
        default=None,
        metavar="JSON",
        help="train every point of a grid of TrainConfig fields, e.g. '{\"lr\": [1e-3, 3e-4]}', into "
        "DIR/<point>/, listed in DIR/search.json",
    )
    p.add_argument(
        "--population",
        action="store_true",
        help="train the --search-space points as stacked models, one batched step for all "
        "(pipeline.training.population); without it they train one after another",
    )
    add_options(p, TrainConfig, group="training (pipeline.training.config.TrainConfig)")
    return p


def _progress_line(r: dict) -> str:
    return (
        f"epoch {r['epoch']:>7} step {r['step']:>7}  train_loss {r['train_loss']:.5f}  "
        f"val_mse {r['val_mse']:.5f}  best {r['best_val_mse']:.5f}  {r['elapsed_s']:7.1f}s"
    )


def summary_table(result) -> str:
    m = result.metrics
    rows = [
        ("model directory", str(result.model_dir)),
        ("test MSE (actions)", _number(m.get("test_mse"))),
        ("test MSE (normalized)", _number(m.get("test_mse_normalized"))),
        ("test R² (mean)", _number(m.get("test_r2"))),
        ("test mean-action baseline MSE", _number(m.get("test_baseline_mse"))),
        ("validation MSE (heldout_mse)", f"{m['heldout_mse']:.6f}"),
        ("validation MSE (normalized)", f"{m['heldout_mse_normalized']:.6f}"),
        ("validation baseline MSE", f"{m['baseline_mse']:.6f}"),
        ("train MSE", f"{m['train_mse']:.6f}"),
        ("epochs (best)", f"{m['epochs']} ({m['best_epoch']})"),
        ("stopped early", str(m["stopped_early"])),
        ("train time", f"{m['train_time_s']:.1f} s"),
        ("samples/s", f"{m['samples_per_s']:,.0f}" if m["samples_per_s"] else "-"),
        ("split / keep", f"{result.config.split} / {result.config.keep}"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])


def _number(v) -> str:
    return "- (no test part)" if v is None else f"{v:.6f}"


def check_out(out) -> Path:
    """`--out` as a path a model directory can replace, checked before any data is loaded: not a file, not
    a folder of other things (replacing it would delete them), in a writable place."""
    out = Path(out).expanduser()
    if out.is_file():
        raise TrainConfigError(f"--out {out} is a file; give a directory for the model")
    if out.is_dir() and not (out / PARAMS_FILE).is_file() and any(out.iterdir()):
        raise TrainConfigError(
            f"--out {out} is a folder that holds other files and no model ({PARAMS_FILE}); writing the model "
            "there would replace them: give a new or empty directory, or a model directory"
        )
    check_writable(out.resolve().parent)
    return out


def check_folder_out(out, marker: str, flag: str) -> Path:
    """`--out` of a command that writes several model directories (`--split-seeds`, `--search-space`): a new
    or empty folder, or one this command wrote before (it holds `marker`), in a writable place."""
    out = Path(out).expanduser()
    if out.is_file():
        raise TrainConfigError(f"--out {out} is a file; give {flag} a directory for its models")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise TrainConfigError(
            f"--out {out} holds other files and no {marker}; give {flag} a new or empty folder"
        )
    check_writable(out.resolve().parent)
    return out


def _check_modes(args, seeds) -> None:
    """Refuse flags that do not combine, before any data is loaded."""
    if seeds is not None and args.ensemble != 1:
        raise TrainConfigError("--split-seeds and --ensemble cannot be combined; run one, then the other")
    if args.population and args.search_space is None:
        raise TrainConfigError(
            "--population needs --search-space JSON (the points to train together), e.g. "
            "--search-space '{\"lr\": [1e-3, 3e-4]}'"
        )
    if args.search_space is not None and (seeds is not None or args.ensemble != 1):
        raise TrainConfigError("--search-space cannot be combined with --split-seeds or --ensemble")


def _search_space(args, transitions, config, out) -> int:
    """`--search-space` (with `--population`): every point into DIR/<point>/, then a table of them."""
    from pipeline.training.population import run_search_space

    def on_eval(i, r):
        print(f"[{i}] {_progress_line(r)}", flush=True)

    results = run_search_space(
        transitions,
        config,
        args.search_space,
        out,
        None if args.quiet else on_eval,
        dataset_name=args.name,
        population=args.population,
    )
    best = min(range(len(results)), key=lambda i: results[i].metrics["heldout_mse"])
    how = (
        f"population of {len(results)}" if args.population else f"{len(results)} trainings one after another"
    )
    print(f"{how}; validation MSE chooses (*), test MSE is only reported")
    for i, r in enumerate(results):
        m = r.metrics
        mark = "*" if i == best else " "
        print(
            f"{mark} {r.model_dir.name:<40} val MSE {m['heldout_mse']:.6f}  test MSE "
            f"{m.get('test_mse') if m.get('test_mse') is None else format(m['test_mse'], '.6f')}"
        )
    print(f"models in {out}/<point>/, summary in {out / 'search.json'}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = from_namespace(TrainConfig, args)
    from pipeline.data.sources import load_transitions

    try:
        config.validate()
        if args.name is not None and not is_valid_name(args.name):
            raise TrainConfigError(
                f"--name {args.name!r} is not a model name (letters, digits, '.', '_', '-')"
            )
        if args.ensemble < 1:
            raise TrainConfigError(
                f"--ensemble must be >= 1 (1: one model, K: K members), got {args.ensemble}"
            )
        seeds = parse_seeds(args.split_seeds) if args.split_seeds is not None else None
        _check_modes(args, seeds)
        if args.search_space is not None:
            out = check_folder_out(args.out, SEARCH_JSON, "--search-space")
        else:
            out = (
                check_out(args.out)
                if seeds is None
                else check_folder_out(args.out, SPLITS_JSON, "--split-seeds")
            )
        transitions = load_transitions(args.dataset, download=args.download)
        print(
            f"{transitions.name}: {len(transitions):,} transitions, obs_dim {transitions.obs_dim}, "
            f"act_dim {transitions.act_dim}; training {config.arch} "
            f"(split={config.split}, keep={config.keep})",
            flush=True,
        )
        if args.search_space is not None:
            return _search_space(args, transitions, config, out)
        on_eval = None if args.quiet else (lambda r: print(_progress_line(r), flush=True))
        if seeds is not None:
            summary, _ = train_split_seeds(
                transitions, config, out, seeds, on_eval=on_eval, dataset_name=args.name
            )
            print(splits_table(summary), end="")
            print(f"models in {out}/split-<seed>/, summary in {out / SPLITS_JSON}")
            return 0
        if args.ensemble != 1:
            from pipeline.training.ensemble import train_ensemble

            _, results = train_ensemble(
                transitions, config, out, args.ensemble, on_eval=on_eval, dataset_name=args.name
            )
            result = dataclasses.replace(results[0], model_dir=out)
        else:
            result = train(transitions, config, out, on_eval=on_eval, dataset_name=args.name)
    except InvdynError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(result))
    if args.ensemble != 1:
        print(
            f"ensemble of {args.ensemble} members (seeds {config.seed}.."
            f"{config.seed + args.ensemble - 1}); the table shows member 0"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
