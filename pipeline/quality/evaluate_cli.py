"""`python -m pipeline.evaluate MODEL DATASET [--json] [--part test|val] [--closed-loop ...]`: the command
line of `pipeline.quality.evaluate` (its module doc says what is scored and on which rows)."""

from __future__ import annotations

import argparse
import json
import sys

from invdyn.errors import InvdynError, ShapeError
from pipeline.dataclass_cli import add_options, from_namespace
from pipeline.quality.closed_loop import ClosedLoopConfig, parse_floats, parse_names
from pipeline.quality.evaluate import (
    CLOSED_LOOP_FIELDS,
    PARTS,
    EvalConfig,
    EvaluationError,
    attach_evaluation,
    evaluate,
    format_table,
    load_model,
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Evaluate an IDM on a dataset's held-out episodes, including closed-loop MuJoCo checks.",
    )
    ap.add_argument(
        "model", metavar="MODEL", help="model directory, bundle .zip / URL, models:/ URI or cached name"
    )
    ap.add_argument("dataset", metavar="DATASET", help="dataset name, path or minari:<id>")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument(
        "--part",
        choices=PARTS,
        default=None,
        help="episodes to score: test (default; val for a model trained before test parts) or val",
    )
    add_options(ap, EvalConfig, skip=CLOSED_LOOP_FIELDS)
    ap.add_argument("--seed", type=int, default=EvalConfig.seed, help="seed of the sampled states")
    ap.add_argument("--no-physics", action="store_true", help="skip the MuJoCo metrics")
    ap.add_argument(
        "--closed-loop",
        action="store_true",
        help="also execute an oracle planner's plans through the model and report the return (MuJoCo)",
    )
    ap.add_argument(
        "--plan-noise",
        type=parse_floats,
        default=ClosedLoopConfig.plan_noise,
        help="σ values of the plan noise ŝ + σ·std·ε, comma-separated (default: 0,0.05)",
    )
    ap.add_argument(
        "--episodes",
        type=int,
        default=ClosedLoopConfig.episodes,
        help="closed-loop episodes per σ (default: 10)",
    )
    ap.add_argument(
        "--planner",
        type=parse_names,
        default=ClosedLoopConfig.planners,
        help="oracle planner(s): expert (default), medium, or both comma-separated",
    )
    ap.add_argument("--attach", action="store_true", help="also write the results into MODEL's directory")
    ap.add_argument(
        "--log-to-registry",
        action="store_true",
        help="MODEL is a models:/ URI: set the headline metrics as eval.* tags on that registered version",
    )
    ap.add_argument(
        "--mlflow-uri", default=None, help="registry for --log-to-registry (default: $MLFLOW_TRACKING_URI)"
    )
    return ap


def closed_loop_config(args):
    """The ClosedLoopConfig `--closed-loop` asked for (checked), or None."""
    if not args.closed_loop:
        return None
    config = ClosedLoopConfig(plan_noise=args.plan_noise, episodes=args.episodes, planners=args.planner)
    try:
        config.validate()
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    return config


def main(argv=None, *, log_evaluation=None) -> int:
    """The CLI; `log_evaluation(model_uri, result, mlflow_uri)` serves --log-to-registry (the registry sits
    above this package: `python -m pipeline.evaluate` passes pipeline.registry.register.log_evaluation)."""
    args = parser().parse_args(argv)
    from pipeline.data.sources import load_transitions

    config = from_namespace(EvalConfig, args)
    try:
        model = _checked_model(args, config, log_evaluation)  # every argument before any long work
        loop = closed_loop_config(args)
        transitions = load_transitions(args.dataset)
        result = evaluate(
            model,
            transitions,
            horizon=config.horizon,
            physics=not args.no_physics,
            one_step_samples=config.samples,
            tracking_starts=config.starts,
            seed=config.seed,
            progress=not args.json and sys.stderr.isatty(),
            part=args.part,
            closed_loop=loop,
        )
        if args.attach:
            attach_evaluation(model.path, result)
        if args.log_to_registry:
            result["registry"] = log_evaluation(args.model, result, args.mlflow_uri)
    except (InvdynError, ShapeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0


def _checked_model(args, config: EvalConfig, log_evaluation):
    """The model, once the options that need no data are known to be usable (else EvaluationError)."""
    from invdyn.settings import mlflow_tracking_uri, model_cache_dir

    config.validate()
    if args.log_to_registry:
        if log_evaluation is None:
            raise EvaluationError("--log-to-registry: run it as `python -m pipeline.evaluate`")
        if not args.model.startswith("models:/"):
            raise EvaluationError(
                f"--log-to-registry tags a registered version: MODEL must be a models:/ URI, got {args.model}"
            )
        if not (args.mlflow_uri or mlflow_tracking_uri()):
            raise EvaluationError("--log-to-registry needs --mlflow-uri or MLFLOW_TRACKING_URI")
    model = load_model(args.model, args.dataset)
    if args.attach and model.path is None:
        raise EvaluationError(f"--attach needs a model directory; {args.model} was not loaded from one")
    if args.attach and model.path.resolve().is_relative_to(model_cache_dir().resolve()):
        raise EvaluationError(
            f"--attach would change {model.path}, an installed model whose files are checksummed; copy it "
            "to a folder of your own and evaluate that"
        )
    return model


if __name__ == "__main__":
    sys.exit(main())
