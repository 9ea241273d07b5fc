"""invdyn: pretrained inverse dynamics models for offline RL. Imports torch + numpy only."""

__version__ = "0.1.0"

from .bundle import extract_bundle, verify_bundle, write_bundle  # noqa: E402
from .ensemble import EnsembleIDM  # noqa: E402
from .errors import (  # noqa: E402
    BundleNotFoundError,
    ChecksumError,
    DownloadError,
    FormatError,
    InvdynError,
    ModelNotFoundError,
    NormalizerMismatchError,
    ShapeError,
    StorageError,
)
from .hub import fetch, list_models, load  # noqa: E402
from .model_dir import read_model_dir, save_model_dir  # noqa: E402
from .models import ARCHITECTURES, FancyMlpInvDynamic, MlpInvDynamic, build_model  # noqa: E402
from .normalizer import GaussianNormalizer  # noqa: E402
from .pretrained import PretrainedIDM  # noqa: E402
from .settings import configure  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "BundleNotFoundError",
    "ChecksumError",
    "DownloadError",
    "EnsembleIDM",
    "FancyMlpInvDynamic",
    "FormatError",
    "GaussianNormalizer",
    "InvdynError",
    "MlpInvDynamic",
    "ModelNotFoundError",
    "NormalizerMismatchError",
    "PretrainedIDM",
    "ShapeError",
    "StorageError",
    "__version__",
    "build_model",
    "configure",
    "extract_bundle",
    "fetch",
    "list_models",
    "load",
    "read_model_dir",
    "save_model_dir",
    "verify_bundle",
    "write_bundle",
]
