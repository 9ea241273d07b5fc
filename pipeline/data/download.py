"""D4RL downloads by catalog name into $D4RL_DATASET_DIR (under the URL's file name, as d4rl does), from
D4RL or a mirror, checked as HDF5 once complete; the transfer itself is `invdyn._download.download`."""

from __future__ import annotations

from pathlib import Path

from invdyn._download import download
from invdyn.errors import DownloadError
from invdyn.settings import d4rl_mirror
from pipeline.data.catalog import CATALOG, DatasetError, file_path, unknown
from pipeline.data.readers import check_hdf5

D4RL_BASE = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


def dataset_url(name: str) -> str:
    """The URL of a D4RL file: $INVDYN_D4RL_MIRROR, when set, replaces D4RL_BASE, so the same relative
    paths come from a mirror or a local server."""
    entry = CATALOG.get(name)
    if entry is None:
        raise unknown(name)
    if entry["url"] is None:
        raise DatasetError(
            f"{name} is simulated, not downloaded: run `python -m pipeline.simulate {name}` "
            f"(or `python -m pipeline.datasets prepare {name}`)"
        )
    mirror = d4rl_mirror()
    return (
        mirror + entry["url"][len(D4RL_BASE) :]
        if mirror and entry["url"].startswith(D4RL_BASE)
        else entry["url"]
    )


def missing_message(name: str) -> str:
    """What to do when a D4RL file is not on disk: the URL and the exact path to put it at."""
    return (
        f"{name}: file not found at {file_path(name)}. Download {dataset_url(name)} and save it at exactly "
        f"that path, or run `python -m pipeline.datasets download {name}` (needs the internet; "
        "pass download=True / --download to let the pipeline do it)"
    )


def download_dataset(name: str, *, progress: bool = True) -> Path:
    """Fetch `name`'s file (resuming a partial one) and check it is a readable D4RL-layout HDF5."""
    url = dataset_url(name)
    dest = file_path(name)
    if dest.is_file():
        check_hdf5(dest)
        return dest
    try:
        download(url, dest, desc=name, progress=progress)
    except DownloadError as e:
        raise DownloadError(
            f"{e}\n{name}: without the internet, download {url} elsewhere and save it at exactly {dest}"
        ) from None
    try:
        check_hdf5(dest)
    except DatasetError as e:
        dest.unlink(missing_ok=True)
        raise DatasetError(
            f"downloaded {url} but it is not a valid D4RL file, so it was removed: {e}"
        ) from None
    return dest
