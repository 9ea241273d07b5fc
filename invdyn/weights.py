"""A model directory's weight files: `model.safetensors` (read by preference, no code path) and
`model.ckpt` (CleanDiffuser's torch.save), each checked against its recorded sha256 before it is parsed."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from .errors import ChecksumError, FormatError, ModelNotFoundError

#: torch.save({"state_dict": {...}}) with CleanDiffuser's key names: what CleanDiffuser's `from_pretrained`
#: and invdyn 0.1 read
CKPT_FILE = "model.ckpt"
#: the same tensors under the same names in safetensors' format (a JSON header and raw bytes: nothing runs)
SAFETENSORS_FILE = "model.safetensors"
#: no IDM is anywhere near this (a 512-wide one is ~2 MB): a larger weights file is refused unread
MAX_WEIGHTS_BYTES = 4 << 30
_CHUNK = 1 << 20


def write_weights(folder: Path, state_dict: dict) -> dict:
    """Write both weight files into `folder` and return params.json's "weights" entry.

    The entry keeps invdyn 0.1's keys for the checkpoint ({"file", "sha256"}: older readers still verify
    it) and adds {"safetensors": {"file", "sha256"}}.
    """
    safetensors_torch = _safetensors()
    buf = io.BytesIO()  # serialized in memory: a full disk then fails as an OSError, not torch's RuntimeError
    torch.save({"state_dict": state_dict}, buf)
    ckpt = buf.getvalue()
    # safetensors stores each tensor's bytes as one block: contiguous, not sharing memory with another
    tensors = safetensors_torch.save(
        {k: v.contiguous() for k, v in state_dict.items()}, metadata={"format": "pt"}
    )
    (folder / CKPT_FILE).write_bytes(ckpt)
    (folder / SAFETENSORS_FILE).write_bytes(tensors)
    return {
        "file": CKPT_FILE,
        "sha256": hashlib.sha256(ckpt).hexdigest(),
        "safetensors": {"file": SAFETENSORS_FILE, "sha256": hashlib.sha256(tensors).hexdigest()},
    }


def check_weights_entry(path: Path, weights) -> None:
    """Raise FormatError naming params.json unless its "weights" entry has the shape write_weights gives."""
    expected = '{"file": name, "sha256": hex, "safetensors": {"file": name, "sha256": hex}}'
    entries = [weights]
    if isinstance(weights, dict) and "safetensors" in weights:
        entries.append(weights["safetensors"])
    for entry in entries:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k, ""), str) for k in ("file", "sha256")
        ):
            raise FormatError(f"{path}: 'weights' must be an object {expected}, got {weights!r:.200}")
        named = entry.get("file")
        if named and Path(named).name != named:
            raise FormatError(f"{path}: 'weights' file names must be plain file names, got {named!r}")
    safetensors = weights.get("safetensors") if isinstance(weights, dict) else None
    if safetensors is not None and not (safetensors.get("file") and safetensors.get("sha256")):
        raise FormatError(
            f"{path}: 'weights.safetensors' needs both 'file' and 'sha256', got {safetensors!r}"
        )


def read_state_dict(model_dir: Path, weights: dict) -> tuple[dict, Path]:
    """(state_dict, the file it came from). Every weight file params.json names must be present with its
    sha256; safetensors is parsed when recorded, else the checkpoint (torch.load with weights_only)."""
    safetensors = weights.get("safetensors")
    ckpt = _checkpoint_path(model_dir, weights)
    ckpt_data = _read_verified(ckpt, weights.get("sha256"))
    if safetensors is None:
        return _parse_checkpoint(ckpt, ckpt_data), ckpt
    path = model_dir / safetensors["file"]
    data = _read_verified(path, safetensors["sha256"])
    try:
        state_dict = _safetensors().load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and others) on bad bytes
        raise FormatError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return state_dict, path


def _checkpoint_path(model_dir: Path, weights: dict) -> Path:
    named = weights.get("file")
    if named:
        return model_dir / named
    ckpts = sorted(p for p in model_dir.iterdir() if p.suffix == ".ckpt")  # CleanDiffuser's own layout
    if not ckpts:
        raise ModelNotFoundError(f"no *.ckpt weights file in {model_dir}")
    if len(ckpts) > 1:
        raise FormatError(
            f"{model_dir} holds several checkpoints ({', '.join(p.name for p in ckpts)}); keep one"
        )
    return ckpts[0]


def _read_verified(path: Path, expected: str | None) -> bytes:
    """The file's bytes, read once (what is hashed is what is parsed); ChecksumError unless they match
    `expected` (when recorded)."""
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError as e:  # e.g. a name too long for the file system
        raise ModelNotFoundError(f"{path} cannot be read ({e.strerror or e})") from None
    if size is None:
        raise ModelNotFoundError(f"{path} (named in {path.parent / 'params.json'} 'weights') does not exist")
    if size > MAX_WEIGHTS_BYTES:
        raise FormatError(f"{path} is {size} bytes: implausibly large for model weights; refusing to read it")
    h, chunks = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            chunks.append(block)
    actual = h.hexdigest()
    if expected and actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual} does not match {expected} recorded in params.json")
    return b"".join(chunks)


def _parse_checkpoint(path: Path, data: bytes) -> dict:
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise FormatError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    state_dict = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict):
        raise FormatError(f"{path}: no 'state_dict' in the checkpoint")
    return state_dict


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise FormatError(
            "model.safetensors needs the safetensors package, an invdyn dependency: pip install safetensors"
        ) from None
    return safetensors.torch
