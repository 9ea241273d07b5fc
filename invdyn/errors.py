"""Exceptions with messages a user can act on: each names the file / key / model and the fix."""


class InvdynError(Exception):
    """Base class of every error invdyn raises on purpose."""


class ModelNotFoundError(InvdynError, LookupError):
    """No model of that name in any place `load` looks."""


class FormatError(InvdynError, ValueError):
    """A params.json, checkpoint, manifest or bundle that is not in the expected format."""


class ChecksumError(InvdynError):
    """A file whose sha256 differs from the one recorded for it (corrupt, truncated or tampered)."""


class ShapeError(InvdynError, ValueError):
    """Weights or inputs whose shape does not match the model's configuration."""


class DownloadError(InvdynError, OSError):
    """A download that failed or was refused (offline mode, bad scheme, HTTP error)."""


class BundleNotFoundError(InvdynError, FileNotFoundError):
    """A bundle path that does not exist or is not a file."""


class StorageError(InvdynError, OSError):
    """A place invdyn must write to is read-only, full or not permitted (the message names the path)."""


class NormalizerMismatchError(InvdynError, ValueError):
    """A planner's observation normalizer that does not match the model's (the message names the dims)."""
