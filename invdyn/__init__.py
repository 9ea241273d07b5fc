"""invdyn: pretrained inverse dynamics models for offline RL. Imports torch + numpy only."""

__version__ = "0.1.0"

from .errors import ChecksumError, DownloadError, FormatError, InvdynError, ModelNotFoundError, ShapeError  # noqa: E402
from .model_dir import read_model_dir, save_model_dir  # noqa: E402
from .models import ARCHITECTURES, FancyMlpInvDynamic, MlpInvDynamic, build_model  # noqa: E402
from .normalizer import GaussianNormalizer  # noqa: E402
from .pretrained import PretrainedIDM  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "ChecksumError",
    "DownloadError",
    "FancyMlpInvDynamic",
    "FormatError",
    "GaussianNormalizer",
    "InvdynError",
    "MlpInvDynamic",
    "ModelNotFoundError",
    "PretrainedIDM",
    "ShapeError",
    "__version__",
    "build_model",
    "read_model_dir",
    "save_model_dir",
]
