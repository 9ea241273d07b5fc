"""The agents' return table (from the committed cards) and the dataset-facts table of the sim-d4rl sets and
the open-loop sim sets: `python bench/agents.py [--transitions 50000] [--seed 0]` (prints Markdown)."""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline.data.catalog import SIM_POLICIES, SUITES
from pipeline.data.facts import dataset_facts
from pipeline.data.sources import load_transitions
from pipeline.sim.agent_policy import AGENT_DIR
from pipeline.sim.agent_rollout import agent_chunk
from pipeline.sim.simulate import simulate

ENVS = ("halfcheetah", "hopper", "walker2d")


def agents_table() -> list[str]:
    rows = [
        "| env | checkpoint | steps | return (mean ± std) | D4RL-normalized | finished | wall h | CPU h |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env in ENVS:
        card = json.loads((AGENT_DIR / env / "card.json").read_text())
        for name, s in card["scores"].items():
            note = "" if name == "expert" or card["medium_reached"] else " (provisional)"
            rows.append(
                f"| {card['env_id']} | {name}{note} | {s['steps']:,} | {s['return_mean']:.1f} ± "
                f"{s['return_std']:.1f} | {s['normalized']:.1f} | {card['finished']} | "
                f"{card['wall_s'] / 3600:.2f} | {card['cpu_s'] / 3600:.2f} |"
            )
    return rows


def facts_table(transitions: int, seed: int, out: Path) -> list[str]:
    rows = [
        "| dataset | transitions | episodes | return (mean ± std) | normalized | velocity at ±10 | "
        "actions at bounds |",
        "|---|---|---|---|---|---|---|",
    ]
    names = SUITES["sim-d4rl"] + [f"sim-{e}-{p}-v0" for e in ENVS for p in SIM_POLICIES]
    for name in names:
        path = simulate(name, transitions=transitions, seed=seed, out_dir=out, progress=False)
        t = load_transitions(str(path), use_cache=False)
        f = dataset_facts(t, path)
        rows.append(
            f"| {name} | {len(t):,} | {f['return_episodes']} "
            f"| {f['return_mean']:.1f} ± {f['return_std']:.1f} "
            f"| {f['normalized_score']:.1f} | {100 * f['velocity_clip_fraction']:.1f} % "
            f"| {100 * f['action_bound_fraction']:.1f} % |"
        )
    return rows


def throughput(steps: int) -> list[str]:
    rows = ["| env | medium | expert |  (agent rollout steps per CPU-second, one process)", "|---|---|---|"]
    for env in ENVS:
        rates = []
        for checkpoint in ("medium", "expert"):
            agent_chunk(env, checkpoint, 0, 0, 10)
            t0 = time.process_time()
            agent_chunk(env, checkpoint, 0, 1, steps)
            rates.append(steps / (time.process_time() - t0))
        rows.append(f"| {env} | {rates[0]:,.0f} | {rates[1]:,.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transitions", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5000, help="steps per throughput measurement")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("\n".join(agents_table()) + "\n")
    print("\n".join(throughput(args.steps)) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(facts_table(args.transitions, args.seed, Path(tmp))))


if __name__ == "__main__":
    main()
