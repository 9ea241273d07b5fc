"""Simulated D4RL-layout datasets from MuJoCo (Gymnasium), and replaying states to judge an IDM by physics.
Importing it registers the "simulated" source kind: a missing sim-* file is generated where it is loaded."""

from pathlib import Path

from pipeline.data.sources import KINDS, SourceKind, register_kind


def _generate(name: str, path: Path) -> None:
    # imported on first use: `import pipeline` (which imports this package) stays light
    from pipeline.sim.simulate import make_missing

    make_missing(name, path)


def _check(src) -> None:
    from pipeline.sim.simulate import check_agents_current

    check_agents_current(src.name, src.path)


register_kind(
    "simulated",
    SourceKind(read=KINDS["hdf5"].read, cache_tag=KINDS["hdf5"].cache_tag, make=_generate, check=_check),
)
