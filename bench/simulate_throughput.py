"""Simulation throughput, MuJoCo steps per second per env and policy and end to end with 1 vs 2 workers:
`python bench/simulate_throughput.py [--steps 5000] [--transitions 50000]`; writes
bench/simulate_throughput.md."""

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, header, load_note, md_table, parser, write_record  # noqa: E402, I001

from pipeline.data.catalog import SIM_ENVS, SIM_POLICIES, SUITES
from pipeline.sim.rollout import rollout_chunk
from pipeline.sim.simulate import simulate

# Per (env, policy): one process rolls out --steps transitions (env stepping, policy, recording; no file),
# reported per CPU-second (time.process_time), which a busy shared machine does not distort.
# End to end: `simulate()` of the sim suite's halfcheetah set (--transitions) with workers=1 and workers=2,
# including worker start-up and the HDF5 write: wall time, and CPU time of this process plus its waited-for
# children (the pool's workers are the forkserver's children, so their CPU time is not in that figure).


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--transitions", type=int, default=50_000)
    add_out(ap, ROOT / "bench" / "simulate_throughput.md")
    args = ap.parse_args()
    lines = header("Simulation throughput", "bench/simulate_throughput.py", "CPU only, " + load_note())
    rows = []
    for env in SIM_ENVS:
        rollout_chunk(env, "random", 0, 0, 10)  # model compile outside the timing
        row = []
        for policy in SIM_POLICIES:
            t0 = time.process_time()
            rollout_chunk(env, policy, 0, 1, args.steps)
            row.append(args.steps / (time.process_time() - t0))
        rows.append([env, *(f"{r:,.0f}" for r in row)])
        print(
            f"{env}: " + ", ".join(f"{p} {r:,.0f}" for p, r in zip(SIM_POLICIES, row, strict=True)),
            flush=True,
        )
    lines += ["Steps per CPU-second, one process:", "", *md_table(["env", *SIM_POLICIES], rows), ""]
    name = SUITES["sim"][0]
    ends = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cpu0, t0 = _cpu(), time.perf_counter()
            simulate(name, transitions=args.transitions, out_dir=tmp, workers=workers, progress=False)
            secs, cpu = time.perf_counter() - t0, _cpu() - cpu0
            ends.append([workers, f"{secs:.1f}", f"{args.transitions / secs:,.0f}", f"{cpu:.1f}"])
    lines += [f"End to end: `simulate` of {name}, {args.transitions:,} transitions:", ""]
    lines += md_table(["workers", "wall s", "steps/s", "CPU s (this process + waited-for children)"], ends)
    write_record(lines, args.out)


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()
