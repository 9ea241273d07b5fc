"""`python -m pipeline.agents train ENV` (train or resume an agent) and `publish ENV` (copy its actors,
medium-replay record and card into the committed folder)."""

from __future__ import annotations

import argparse
import sys

from invdyn.errors import InvdynError
from pipeline.agents.config import AgentConfig
from pipeline.dataclass_cli import add_options, from_namespace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.agents", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train (or resume) an agent: SAC with rl-zoo3's hyperparameters")
    tr.add_argument("env", help="Hopper-v5, Walker2d-v5, HalfCheetah-v5 or Ant-v5 (or hopper, ...)")
    add_options(tr, AgentConfig)
    pub = sub.add_parser("publish", help="write the trained actors, replay record and card to the repo")
    pub.add_argument("env")
    pub.add_argument("--run-dir", default=AgentConfig.run_dir, help="the training run folder's parent")
    pub.add_argument("--out", default=None, help="folder (default: pipeline/sim/agent_weights)")
    pub.add_argument("--eval-episodes", type=int, default=10, help="episodes per checkpoint for the card")
    pub.add_argument(
        "--expert",
        default="best",
        choices=("best", "latest"),
        help="ship the best evaluation after medium (re-scored on fresh episodes) or the last checkpoint",
    )
    args = ap.parse_args(argv)
    try:
        if args.command == "train":
            from pipeline.agents.train import train

            train(from_namespace(AgentConfig, args))
        else:
            from pipeline.agents.publish import publish

            print(
                publish(
                    args.env,
                    run_dir=args.run_dir,
                    out=args.out,
                    eval_episodes=args.eval_episodes,
                    expert=args.expert,
                )
            )
    except InvdynError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with the same command (it continues from the last checkpoint)")
        return 130
    return 0
