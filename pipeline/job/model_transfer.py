"""How a trial's model directory reaches the driver with no file system shared between nodes: packed with a
sha256 per file, handed to an inbox actor on the driver's node before the trial reports, checked again
where it is unpacked (DIR/trial-models/<trial key>/).

Models are 1-10 MB, so Ray's object store carries them well. The storage path (`--storage-path`) then holds
only Tune's state, and a cluster without NFS or S3 loses no model: a trial counts as finished only once its
model is on the driver's node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from invdyn._files import atomic_dir
from invdyn.errors import InvdynError

#: the folder of DIR that holds every finished trial's model directory, by trial key
TRIAL_MODELS = "trial-models"


class ModelTransferError(InvdynError):
    """A model that did not arrive whole: missing, or a file whose bytes are not the ones the trial sent."""


@dataclass(frozen=True)
class PackedModel:
    """A model directory in memory: each file's bytes and sha256 by its path inside the directory."""

    files: dict[str, bytes]
    sha256: dict[str, str]

    @property
    def digest(self) -> str:
        """One sha256 over every (path, file sha256): what the trial reports, to match what arrives."""
        return _digest(self.sha256)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def _digest(sha256: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path in sorted(sha256):
        h.update(f"{path}\0{sha256[path]}\n".encode())
    return h.hexdigest()


def pack(folder) -> PackedModel:
    """Every file under `folder` (a model directory, or a population's folder of them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelTransferError(f"{folder}: no model directory to send")
    files, sums = {}, {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            files[rel] = p.read_bytes()
            sums[rel] = hashlib.sha256(files[rel]).hexdigest()
    if not files:
        raise ModelTransferError(f"{folder}: the model directory is empty")
    return PackedModel(files, sums)


def verify(packed: PackedModel, digest: str | None = None, what: str = "model") -> None:
    """Raise ModelTransferError unless every file's bytes have the sha256 sent with them (and the whole is
    `digest`, when given): bytes that crossed the network are trusted only after this."""
    if set(packed.files) != set(packed.sha256):
        raise ModelTransferError(f"{what}: the file list and the checksum list differ")
    for rel, data in packed.files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
            raise ModelTransferError(f"{what}: refusing file path {rel!r} (outside the model directory)")
        if hashlib.sha256(data).hexdigest() != packed.sha256[rel]:
            raise ModelTransferError(f"{what}: {rel} does not match its sha256 (damaged in transfer)")
    if digest is not None and packed.digest != digest:
        raise ModelTransferError(
            f"{what}: the files that arrived (sha256 {packed.digest[:12]}) are not the ones the trial "
            f"reported (sha256 {digest[:12]})"
        )


def unpack(packed: PackedModel, dest, digest: str | None = None, what: str = "model") -> Path:
    """Check `packed`, then write it as the directory `dest`, atomically (readers see all of it or none)."""
    verify(packed, digest, what)
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        for rel, data in packed.files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return dest


class ModelInbox:
    """Ray actor on the driver's node: holds each trial's packed model, by trial key, until the driver takes
    it. A trial's `put` returns once its model is here, checked; only then does the trial report."""

    def __init__(self):
        self.models: dict[str, PackedModel] = {}

    def put(self, key: str, packed: PackedModel) -> str:
        verify(packed, what=f"trial {key}'s model")
        self.models[key] = packed  # a retried trial's model replaces its earlier attempt's
        return packed.digest

    def take(self, key: str) -> PackedModel | None:
        return self.models.pop(key, None)

    def keys(self) -> list[str]:
        return sorted(self.models)


def open_inbox():
    """A ModelInbox actor pinned to this driver's node (it dies with the driver, like the job)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(ModelInbox).options(
        num_cpus=0,
        max_concurrency=8,  # trials finishing together each hand in their model at once
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    )
    return actor.remote()


def send(folder, inbox, key: str) -> str:
    """From the trial: pack `folder` and hand it to the inbox; returns the digest to report. Raises when the
    inbox does not have it: the trial fails (and is retried) rather than report a model that is not there."""
    import ray

    packed = pack(folder)
    got = ray.get(inbox.put.remote(key, packed))
    if got != packed.digest:
        raise ModelTransferError(f"trial {key}: the driver's inbox holds another model than the one sent")
    return got


def receive(inbox, key: str, digest: str | None, dest) -> Path:
    """On the driver: take trial `key`'s model from the inbox, check it against the `digest` the trial
    reported, and write it to `dest`."""
    import ray

    what = f"trial {key}'s model"
    if not digest:
        raise ModelTransferError(f"{what}: the trial reported no model checksum (model_sha256)")
    packed = ray.get(inbox.take.remote(key))
    if packed is None:
        raise ModelTransferError(f"{what} never reached the driver's inbox")
    return unpack(packed, dest, digest, what)


def put_dir(source):
    """An object-store reference to the model directory `source` packed, for a Ray task on any node (which
    unpacks it with `unpack`). `source` is a folder on this node, or an older job's checkpoint URI."""
    import tempfile

    import ray

    if Path(source).is_dir():
        return ray.put(pack(source))
    import ray.train

    with tempfile.TemporaryDirectory(prefix="invdyn-pack-") as tmp:
        return ray.put(pack(ray.train.Checkpoint(source).to_directory(tmp)))
