"""The agents' return table (from the committed cards), their rollout speed, and the dataset-facts table of
the sim-d4rl sets and the open-loop sim sets: `python bench/agents.py [--transitions 50000] [--seed 0]`.

Prints Markdown by default: bench/agents.md holds these tables beside the agents' training record and its
reading, pasted by hand (`--out FILE` writes them to a file of their own).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_out, header, load_note, md_table, parser, write_record  # noqa: E402, I001

from pipeline.data.catalog import SIM_POLICIES, SUITES
from pipeline.data.facts import dataset_facts
from pipeline.data.sources import load_transitions
from pipeline.sim.agent_policy import AGENT_DIR
from pipeline.sim.agent_rollout import agent_chunk
from pipeline.sim.simulate import simulate

ENVS = ("halfcheetah", "hopper", "walker2d")


def agents_table() -> list[str]:
    rows = []
    for env in ENVS:
        card = json.loads((AGENT_DIR / env / "card.json").read_text())
        for name, s in card["scores"].items():
            note = "" if name == "expert" or card["medium_reached"] else " (provisional)"
            rows.append(
                [
                    card["env_id"],
                    f"{name}{note}",
                    f"{s['steps']:,}",
                    f"{s['return_mean']:.1f} ± {s['return_std']:.1f}",
                    f"{s['normalized']:.1f}",
                    card["finished"],
                    f"{card['wall_s'] / 3600:.2f}",
                    f"{card['cpu_s'] / 3600:.2f}",
                ]
            )
    head = ["env", "checkpoint", "steps", "return (mean ± std)", "D4RL-normalized", "finished"]
    return md_table([*head, "wall h", "CPU h"], rows)


def facts_table(transitions: int, seed: int, out: Path) -> list[str]:
    rows = []
    names = SUITES["sim-d4rl"] + [f"sim-{e}-{p}-v0" for e in ENVS for p in SIM_POLICIES]
    for name in names:
        path = simulate(name, transitions=transitions, seed=seed, out_dir=out, progress=False)
        t = load_transitions(str(path), use_cache=False)
        f = dataset_facts(t, path)
        rows.append(
            [
                name,
                f"{len(t):,}",
                f["return_episodes"],
                f"{f['return_mean']:.1f} ± {f['return_std']:.1f}",
                f"{f['normalized_score']:.1f}",
                f"{100 * f['velocity_clip_fraction']:.1f} %",
                f"{100 * f['action_bound_fraction']:.1f} %",
            ]
        )
    head = ["dataset", "transitions", "episodes", "return (mean ± std)", "normalized", "velocity at ±10"]
    return md_table([*head, "actions at bounds"], rows)


def throughput(steps: int) -> list[str]:
    rows = []
    for env in ENVS:
        rates = []
        for checkpoint in ("medium", "expert"):
            agent_chunk(env, checkpoint, 0, 0, 10)
            t0 = time.process_time()
            agent_chunk(env, checkpoint, 0, 1, steps)
            rates.append(steps / (time.process_time() - t0))
        rows.append([env, f"{rates[0]:,.0f}", f"{rates[1]:,.0f}"])
    title = "Agent rollout steps per CPU-second, one process:"
    return [title, "", *md_table(["env", "medium", "expert"], rows)]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--transitions", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5000, help="steps per throughput measurement")
    add_out(ap, "-", "a file for the tables")
    args = ap.parse_args()
    lines = header("The agents and their data", "bench/agents.py", "CPU only, " + load_note())
    lines += [*agents_table(), "", *throughput(args.steps), ""]
    with tempfile.TemporaryDirectory() as tmp:
        lines += facts_table(args.transitions, args.seed, Path(tmp))
    write_record(lines, args.out)


if __name__ == "__main__":
    main()
