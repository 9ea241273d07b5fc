"""What to tell someone who asked for a model that is not installed: which command trains it and which
installs a bundle. The library cannot import the pipeline, so the dataset names it knows are patterns here."""

from __future__ import annotations

import re

_LOCOMOTION = r"(halfcheetah|hopper|walker2d|ant)-(random|medium|expert|medium-replay|medium-expert"
_LOCOMOTION += r"|full-replay|random-expert)-v[0-2]"
#: D4RL names the pipeline downloads itself (its catalog, pipeline/data/d4rl_catalog.json, has these)
D4RL_DOWNLOADABLE = re.compile(
    rf"^({_LOCOMOTION}"
    r"|antmaze-(umaze|umaze-diverse|medium-play|medium-diverse|large-play|large-diverse)-v[0-2]"
    r"|kitchen-(complete|partial|mixed)-v0"
    r"|maze2d-(eval-)?(open|umaze|medium|large)(-dense)?-v[01])$"
)
#: D4RL's Adroit names: not in the pipeline's catalog, so they train from the file itself
D4RL_ADROIT = re.compile(r"^(pen|hammer|door|relocate)-(human|cloned|expert)-v[01]$")
#: the simulated sets (pipeline.data.catalog: sim-<env>-<policy>-v0), generated on demand; the D4RL-like
#: kinds come from the committed agents (hopper, walker2d, halfcheetah)
SIM = re.compile(
    r"^sim-((halfcheetah|hopper|walker2d|ant)-(random|ou|gait|mixed)"
    r"|(halfcheetah|hopper|walker2d)-(medium|expert|medium-replay|medium-expert))-v0$"
)
MINARI_ID_PREFIX = "minari:"
MINARI_MODEL_PREFIX = "minari-"

_JOB = "python -m pipeline.pretrain_all --datasets {spec}{flags} --export invdyn-bundle.zip"
_INSTALL_OWN = "then install it with `python -m invdyn fetch invdyn-bundle.zip`"


def how_to_get(name: str, dataset: str | None = None) -> str:
    """Sentences saying how model `name` (of `dataset`, when known) can be trained or installed; the last
    one is always the bundle way."""
    train = _train_sentence(dataset or name)
    bundle = (
        f"{'Or i' if train else 'I'}nstall a bundle that holds it: "
        "`python -m invdyn fetch <bundle URL or .zip>` or "
        f"`invdyn.load({name!r}, source=<bundle URL or .zip | model dir | models:/...>)`."
    )
    return f"{train} {bundle}" if train else bundle


def _train_sentence(name: str) -> str:
    if SIM.match(name):
        job = _JOB.format(spec=name, flags="")
        return (
            f"{name!r} is a simulated MuJoCo dataset (made on demand, no download): train its model with "
            f"`{job}`, {_INSTALL_OWN}."
        )
    if D4RL_DOWNLOADABLE.match(name):
        job = _JOB.format(spec=name, flags=" --download")
        return f"{name!r} is a D4RL dataset: train its model with `{job}`, {_INSTALL_OWN}."
    if D4RL_ADROIT.match(name):
        job = _JOB.format(spec=f"/path/to/{name}.hdf5", flags="")
        return (
            f"{name!r} is a D4RL Adroit dataset, which the pipeline does not download: save D4RL's file as "
            f"{name}.hdf5 and train its model with `{job}`, {_INSTALL_OWN}."
        )
    if name.startswith(MINARI_ID_PREFIX):
        dataset_id = name[len(MINARI_ID_PREFIX) :]
        job = _JOB.format(spec=name, flags="")
        return (
            f"Train the Minari dataset's model with `minari download {dataset_id}` and `{job}`, "
            f"{_INSTALL_OWN}."
        )
    if name.startswith(MINARI_MODEL_PREFIX):
        job = _JOB.format(spec="minari:<dataset id>", flags="")
        return (
            f"{name!r} is the model of a Minari dataset (minari:door/expert-v0 -> minari-door-expert-v0): "
            f"train it with `minari download <dataset id>` and `{job}`, {_INSTALL_OWN}."
        )
    return ""


def minari_id_message(spec: str, model_name: str) -> str:
    """For `load("minari:<id>")`: a dataset id, not a model name; says the model's name and how to get it."""
    return (
        f"{spec!r} is a Minari dataset id, not a model name: its model is named {model_name!r} "
        f"(invdyn.load({model_name!r})). {how_to_get(model_name, spec)}"
    )
