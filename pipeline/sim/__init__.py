"""Simulated D4RL-layout datasets from MuJoCo (Gymnasium), and replaying states to judge an IDM by physics.

Importing this package registers the "simulated" source kind with pipeline.data.sources (data must not import
sim): a missing sim-* catalog file is then generated wherever it is loaded.
"""

from pathlib import Path

from pipeline.data.sources import KINDS, SourceKind, register_kind


def _generate(name: str, path: Path) -> None:
    # imported on first use: `import pipeline` (which imports this package) stays light
    from pipeline.sim.simulate import make_missing

    make_missing(name, path)


register_kind(
    "simulated", SourceKind(read=KINDS["hdf5"].read, cache_tag=KINDS["hdf5"].cache_tag, make=_generate)
)
