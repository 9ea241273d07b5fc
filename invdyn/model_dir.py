"""The one on-disk model format, a directory CleanDiffuser can read with our metadata beside its keys:
writing, reading and checking one, its model card, and CleanDiffuser's `from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import __version__
from ._files import atomic_dir, write_json
from .ensemble import ENSEMBLE_KEY, card_lines, read_members
from .errors import FormatError, ModelNotFoundError, ShapeError
from .models import ARCHITECTURES, FancyMlpInvDynamic, build_model
from .normalizer import GaussianNormalizer
from .pretrained import PretrainedIDM
from .settings import cleandiffuser_dir, is_valid_name
from .weights import CKPT_FILE, SAFETENSORS_FILE, check_weights_entry, read_state_dict, write_weights

FORMAT_VERSION = 1
#: torch.save({"state_dict": {...}}) with CleanDiffuser's key names; beside it the same tensors in
#: SAFETENSORS_FILE, which invdyn reads by preference (see weights.py)
WEIGHTS_FILE = CKPT_FILE
#: the model card (Markdown)
CARD_FILE = "README.md"
#: {"normalizers": {"state": {"mean", "std"}}, "config": {CleanDiffuser ctor args}, "format_version",
#: "architecture": {"name", ...options}, "name", "dataset": {"name", "sha256", ...}, "metrics": {...},
#: "training": {...}, "learning_curve": [...], "invdyn_version", "weights": {"file": "model.ckpt", "sha256",
#: "safetensors": {"file": "model.safetensors", "sha256"}} (directories written before model.safetensors
#: have only "file" and "sha256"; CleanDiffuser's have no "weights")}; the pipeline
#: adds "heldout_per_dim": {"r2": [...]} (validation) and "test_per_dim": {"r2": [...]} (test episodes;
#: null for a model trained without a test part), and "evaluation": {...} (pipeline.evaluate --attach).
#: "metrics": test_* on the test episodes no choice read, heldout_* on the validation episodes
PARAMS_FILE = "params.json"
#: figures a model directory may hold beside its card, drawn by the pipeline (invdyn draws none): file ->
#: caption. The card links the ones present, so a directory without them still has no broken link.
FIGURES = {
    "learning_curve.png": "learning curve: validation MSE and training loss per step",
    "per_dim_r2.png": "held-out R² per action dimension",
    "closed_loop.png": "closed-loop return of an oracle planner's plans against plan noise σ",
}


def save_model_dir(
    out_dir,
    net,
    normalizer: GaussianNormalizer,
    *,
    name: str | None = None,
    dataset: dict | None = None,
    metrics: dict | None = None,
    training: dict | None = None,
    learning_curve: list | None = None,
    extra: dict | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write a model directory atomically (temp dir + rename) and return its path.

    `files` are more files for the directory (name -> bytes), e.g. the FIGURES; the card links those."""
    out_dir = Path(out_dir)
    files = dict(files or {})
    for fname in files:
        if not is_valid_name(fname) or fname in (WEIGHTS_FILE, SAFETENSORS_FILE, PARAMS_FILE, CARD_FILE):
            raise FormatError(f"{fname!r} cannot be an extra file of a model directory (a plain new name)")
    if normalizer.dim != net.obs_dim:
        raise ShapeError(f"normalizer has {normalizer.dim} dims but the model's obs_dim is {net.obs_dim}")
    state_dict = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()}
    params = {
        "normalizers": {"state": normalizer.to_dict()},
        "config": net.config,
        "format_version": FORMAT_VERSION,
        "invdyn_version": __version__,
        "architecture": {"name": net.arch_name, **net.options},
        "name": name or (dataset or {}).get("name") or out_dir.name,
        "dataset": dataset or {},
        "metrics": metrics or {},
        "training": training or {},
        "learning_curve": learning_curve or [],
        **(extra or {}),
    }
    with atomic_dir(out_dir) as tmp:
        params["weights"] = write_weights(tmp, state_dict)
        write_json(tmp / PARAMS_FILE, params)  # NaN metrics become null
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        (tmp / CARD_FILE).write_text(model_card(params, card_figures(tmp)))
    return out_dir


def card_figures(model_dir) -> list[str]:
    """The FIGURES present in `model_dir`, in FIGURES' order (what its card links)."""
    return [name for name in FIGURES if (Path(model_dir) / name).is_file()]


def read_params(path) -> dict:
    """Parse and validate params.json; every problem names the file and the key."""
    path = Path(path)
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} does not exist: a model directory needs a params.json") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, 5000-digit ints
        raise FormatError(f"{path} is not valid JSON ({e}); re-download or re-export the model") from None
    if not isinstance(params, dict):
        raise FormatError(f"{path}: top level must be a JSON object, got {type(params).__name__}")
    version = params.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: format_version {version!r} is not supported by invdyn {__version__} "
            f"(which reads version {FORMAT_VERSION}); upgrade invdyn"
        )
    config = params.get("config")
    if not isinstance(config, dict):
        raise FormatError(f"{path}: missing or invalid key 'config' (the model's constructor arguments)")
    try:
        state = params["normalizers"]["state"]
        normalizer = GaussianNormalizer.from_dict(state)
    except (KeyError, TypeError):
        raise FormatError(f"{path}: missing key 'normalizers.state.mean' / 'normalizers.state.std'") from None
    except ValueError as e:
        raise FormatError(f"{path}: invalid 'normalizers.state': {e}") from None
    arch = params.get("architecture", {"name": FancyMlpInvDynamic.arch_name})
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("name"), str)
        or arch["name"] not in ARCHITECTURES
    ):
        raise FormatError(f"{path}: unknown 'architecture' {arch!r}; known: {sorted(ARCHITECTURES)}")
    check_weights_entry(path, params.get("weights", {}))
    if normalizer.dim != config.get("obs_dim"):
        raise FormatError(
            f"{path}: 'normalizers.state' has {normalizer.dim} dims but 'config.obs_dim' is "
            f"{config.get('obs_dim')!r}"
        )
    return params


def read_model_dir(model_dir, device="cpu") -> PretrainedIDM:
    """Load a model directory (ours or CleanDiffuser's) into an eval-mode `PretrainedIDM`.

    CleanDiffuser's own directories (params.json with only "normalizers" + "config", one Lightning
    `*.ckpt`) are always `FancyMlpInvDynamic`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model directory {model_dir} does not exist")
    params = read_params(model_dir / PARAMS_FILE)
    arch = params.get("architecture", {"name": FancyMlpInvDynamic.arch_name})
    options = {k: v for k, v in arch.items() if k != "name"}
    try:
        with torch.device("meta"):  # shapes only, no memory: a crafted config cannot exhaust RAM
            shapes = build_model(arch["name"], params["config"], options)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # RuntimeError: sizes torch cannot hold
        raise FormatError(
            f"{model_dir / PARAMS_FILE}: 'config' does not build a {arch['name']} model: {e}"
        ) from None
    state_dict, weights = read_state_dict(model_dir, params.get("weights") or {})
    check_state_dict(shapes, state_dict, weights)  # the weights on disk fit: the real model is their size
    net = build_model(arch["name"], params["config"], options)
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as e:  # right shapes, wrong kind (e.g. complex tensors)
        raise FormatError(f"{weights}: weights cannot be loaded into the model ({e})") from None
    net.eval().to(device)
    normalizer = GaussianNormalizer.from_dict(params["normalizers"]["state"])
    card_path = model_dir / CARD_FILE
    card = card_path.read_text() if card_path.exists() else model_card(params, card_figures(model_dir))
    loaded = PretrainedIDM(net, normalizer, params, card=card, path=model_dir)
    # member 0 is this directory's own model, so CleanDiffuser reads it; the others sit beside it
    return read_members(model_dir, params, loaded, device) if ENSEMBLE_KEY in params else loaded


def from_pretrained(cls, env_name: str):
    """CleanDiffuser's entry point: `(model, params)` from `~/.CleanDiffuser/pretrained/invdyn/<name>/`.

    Unlike the original it raises a clear error instead of printing one and returning `(None, None)`,
    and it reads the checkpoint with `weights_only=True`.
    """
    loaded = read_model_dir(cleandiffuser_dir(env_name))
    return loaded.net, loaded.params


# CleanDiffuser calls `FancyMlpInvDynamic.from_pretrained(name)`. The class gets that method here, where
# directories are read, because models.py (which this module builds nets from) must not import this module.
FancyMlpInvDynamic.from_pretrained = classmethod(from_pretrained)


def check_state_dict(net, state_dict: dict, source) -> None:
    """Raise ShapeError naming the file, the key and both shapes unless `state_dict` fits `net` exactly."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ShapeError(
            f"{source}: weights do not fit params.json's config: missing keys {missing}, unexpected keys "
            f"{unexpected}"
        )
    for key, tensor in own.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ShapeError(
                f"{source}: weight {key!r} has shape {shape} but params.json's config needs "
                f"{tuple(tensor.shape)}"
            )
        if tensor.is_floating_point() and not got.is_floating_point():
            raise FormatError(
                f"{source}: weight {key!r} has dtype {got.dtype}; weights must be floating point"
            )


def model_card(params: dict, figures=()) -> str:
    """A short Markdown model card: dataset, metrics, the `figures` (FIGURES' file names present beside
    it), hyperparameters and how to load."""
    name = params.get("name", "model")
    ds = params.get("dataset") or {}
    metrics = params.get("metrics") or {}
    training = params.get("training") or {}
    arch = params.get("architecture") or {"name": "fancy_mlp"}
    lines = [
        *model_index(params),
        f"# invdyn model: {name}",
        "",
        "Inverse dynamics model `a_t = I(s_t, s_{t+1})` in CleanDiffuser's format "
        f"(architecture `{arch.get('name')}`).",
        "",
        "## Dataset",
        "",
        f"- name: `{ds.get('name', 'unknown')}`",
        f"- sha256: `{ds.get('sha256', 'unknown')}`",
    ]
    for key in ("transitions", "episodes", "obs_dim", "act_dim"):
        if key in ds:
            lines.append(f"- {key}: {ds[key]}")
    lines += ["", "## Metrics", ""]
    if metrics:
        if "test_mse" in metrics:
            lines += [
                "`test_*`: on the test episodes, which no choice (early stop, kept weights, search, "
                "champion) read; `heldout_*`: on the validation episodes that made those choices.",
                "",
            ]
        lines += ["| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {_fmt(v)} |"
            for k, v in sorted(metrics.items(), key=_metric_order)
            if not isinstance(v, (dict, list))
        ]
    else:
        lines.append("not trained by invdyn (no metrics recorded)")
    for fname in figures:
        lines += ["", f"![{FIGURES.get(fname, fname)}]({fname})"]
    lines += card_lines(params)
    lines += ["", "## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted({**params.get("config", {}), **arch}.items())]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(training.items()) if not isinstance(v, (dict, list))]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import invdyn",
        "",
        f'model = invdyn.load("{name}")  # or source="<this directory>"',
        "act = model.predict(obs, next_obs)  # raw observations, normalized inside",
        "model.normalizer.check(planner_normalizer)  # raises, naming the dims, unless they agree",
        "act = model.predict_normalized(o, o2)  # observations normalized as the model's own",
        "act = model.predict_normalized(o, o2, normalizer=planner_normalizer)  # the planner's",
        "```",
        "",
        f"Weights: `{SAFETENSORS_FILE}` (what invdyn reads) and `{WEIGHTS_FILE}` (the same tensors for "
        "CleanDiffuser), each with its sha256 in params.json. CleanDiffuser: copy this directory to "
        "`~/.CleanDiffuser/pretrained/invdyn/<name>/` and call `FancyMlpInvDynamic.from_pretrained(<name>)`. "
        f"ONNX: `python -m invdyn export-onnx {name} --out model.onnx` (normalizer inside).",
        "",
    ]
    return "\n".join(lines)


#: the metrics a card's model-index carries (Hugging Face model-card convention): key -> (type, name)
INDEX_METRICS = {
    "test_mse": ("mse", "test action MSE"),
    "test_mse_normalized": ("normalized_mse", "test action MSE / action variance"),
    "test_r2": ("r2", "test R² (mean over action dimensions)"),
    "test_baseline_mse": ("baseline_mse", "test MSE of the mean training action"),
    "one_step_error": ("one_step_error", "one-step state error (normalized RMSE)"),
    "tracking_drift": ("tracking_drift", "closed-loop tracking drift (normalized RMSE)"),
}


def _metric_order(item) -> tuple:
    """Test metrics first, then validation (heldout_*), then the rest, each alphabetical."""
    key = item[0]
    return (0 if key.startswith("test_") else 1 if key.startswith("heldout_") else 2, key)


def model_index(params: dict) -> list[str]:
    """The card's YAML front matter with a `model-index` of the test figures (none without test metrics), so
    hubs and tools read them; the physics metrics join when an evaluation on the test part is attached."""
    metrics = dict(params.get("metrics") or {})
    if not isinstance(metrics.get("test_mse"), (int, float)):
        return []
    ev = params.get("evaluation") or {}
    if ev.get("part") == "test":
        metrics.update({k: ev.get(k) for k in ("one_step_error", "tracking_drift")})
    name = json.dumps(str(params.get("name", "model")))
    dataset = json.dumps(str((params.get("dataset") or {}).get("name", "unknown")))
    lines = [
        "---",
        "library_name: invdyn",
        "tags: [inverse-dynamics, offline-reinforcement-learning]",
        "model-index:",
        f"- name: {name}",
        "  results:",
        "  - task: {type: inverse-dynamics, name: Inverse dynamics}",
        f"    dataset: {{name: {dataset}, type: {dataset}, split: test}}",
        "    metrics:",
    ]
    for key, (kind, label) in INDEX_METRICS.items():
        value = metrics.get(key)
        if key == "tracking_drift" and ev.get("horizon"):
            label = f"{label} at horizon {ev['horizon']}"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            label = json.dumps(label, ensure_ascii=False)
            lines.append(f"    - {{type: {kind}, value: {float(value)!r}, name: {label}}}")
    return [*lines, "---", ""]


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else f"`{v}`" if isinstance(v, str) else str(v)
