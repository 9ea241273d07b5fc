"""invdyn's dataset-name patterns (the library cannot import the pipeline) agree with the pipeline's
catalog, so the command a miss suggests is one the pipeline accepts."""

import re

import pytest

from invdyn._hints import D4RL_ADROIT, D4RL_DOWNLOADABLE, SIM, how_to_get
from pipeline.data.catalog import CATALOG, resolve_datasets


def _suggested_datasets(name: str) -> str:
    return re.search(r"--datasets (\S+)", how_to_get(name)).group(1)


def test_every_catalog_name_gets_a_command_the_pipeline_accepts():
    for name, entry in CATALOG.items():
        pattern = SIM if entry["simulated"] else D4RL_DOWNLOADABLE
        assert pattern.match(name), f"{name} is in the pipeline's catalog but invdyn's hint misses it"
        suggested = _suggested_datasets(name)
        assert resolve_datasets(suggested) == [name]
        assert ("--download" in how_to_get(name)) == (not entry["simulated"])


@pytest.mark.parametrize(
    "name", ["sim-hopper-random-v1", "sim-humanoid-random-v0", "hopper-medium-v3", "hopper-mediun-v2"]
)
def test_a_name_outside_the_catalog_is_not_promised_a_training_command(name):
    assert name not in CATALOG
    assert "pretrain_all" not in how_to_get(name)


def test_adroit_names_are_not_in_the_catalog_so_the_hint_trains_from_the_file():
    assert D4RL_ADROIT.match("pen-human-v1") and "pen-human-v1" not in CATALOG
    assert _suggested_datasets("pen-human-v1") == "/path/to/pen-human-v1.hdf5"
