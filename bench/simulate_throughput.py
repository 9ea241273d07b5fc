"""Simulation throughput: MuJoCo steps per second per env and policy, and end to end with 1 vs 2 workers.

    python bench/simulate_throughput.py [--steps 5000] [--transitions 50000]

Per (env, policy): one process rolls out --steps transitions (env stepping, policy, recording; no file).
End to end: `simulate()` of the sim suite's halfcheetah set (--transitions) with workers=1 and workers=2,
including process start-up and the HDF5 write. CPU-bound: on a shared machine divide by the load.
"""

import argparse
import os
import tempfile
import time

from pipeline.catalog import SIM_ENVS, SIM_POLICIES, SUITES
from pipeline.rollout import rollout_chunk
from pipeline.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--transitions", type=int, default=50_000)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'env':<12}" + "".join(f"{p:>10}" for p in SIM_POLICIES) + "   (steps/s, one process)")
    for env in SIM_ENVS:
        rollout_chunk(env, "random", 0, 0, 10)  # model compile outside the timing
        row = []
        for policy in SIM_POLICIES:
            t0 = time.perf_counter()
            rollout_chunk(env, policy, 0, 1, args.steps)
            row.append(args.steps / (time.perf_counter() - t0))
        print(f"{env:<12}" + "".join(f"{r:>10,.0f}" for r in row))
    name = SUITES["sim"][0]
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            t0 = time.perf_counter()
            simulate(name, transitions=args.transitions, out_dir=tmp, workers=workers, progress=False)
            secs = time.perf_counter() - t0
            print(f"simulate {name} {args.transitions:,} transitions, workers={workers}: {secs:5.1f} s "
                  f"({args.transitions / secs:,.0f} steps/s incl. start-up and HDF5 write)")


if __name__ == "__main__":
    main()
