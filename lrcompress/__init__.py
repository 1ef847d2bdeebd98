"""lrcompress: post-training low-rank compression for PyTorch models."""

from .calibrate import Calibration, calibrate
from .checkpoint import load, save
from .config import CompressConfig, RecoveryConfig, SVDConfig, WhitenedSVDConfig, method_config
from .data import TensorData, TextData, open_data
from .errors import LrcompressError
from .inspection import inspect
from .pipeline import compress, compress_, plan
from .recovery import RecoveryReport, recover
from .report import CompressionReport
from .sources import resolve

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "CompressConfig",
    "CompressionReport",
    "LrcompressError",
    "RecoveryConfig",
    "RecoveryReport",
    "SVDConfig",
    "TensorData",
    "TextData",
    "WhitenedSVDConfig",
    "calibrate",
    "compress",
    "compress_",
    "inspect",
    "load",
    "method_config",
    "open_data",
    "plan",
    "recover",
    "resolve",
    "save",
]
