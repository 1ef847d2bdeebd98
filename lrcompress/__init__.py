"""lrcompress: post-training low-rank compression for PyTorch models."""

from .calibration.calibrate import Calibration, calibrate
from .io.checkpoint import load, save
from .config import CompressConfig, RecoveryConfig, SVDConfig, WhitenedSVDConfig, method_config
from .io.data import TensorData, TextData, open_data
from .errors import LrcompressError
from .planning.inspection import inspect
from .workflow.pipeline import compress, compress_, gather, plan
from .recovery.train import RecoveryReport, recover
from .workflow.report import CompressionReport
from .io.sources import resolve

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
    "gather",
    "inspect",
    "load",
    "method_config",
    "open_data",
    "plan",
    "recover",
    "resolve",
    "save",
]
