"""ONNX Runtime runner for .onnx and .ort files."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ._files import require_file
from .deps import require
from .errors import BadInput, CorruptArtifact, UnsupportedOp, first_line

EXTRA = "onnx"

_ORT_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _load_error(path: Path, exc: Exception) -> Exception:
    """Map an onnxruntime load failure to an ExportError subclass with a one-line message."""
    kind = type(exc).__name__
    msg = first_line(exc)
    if kind == "NotImplemented" or "Could not find an implementation" in msg:
        return UnsupportedOp(f"onnxruntime cannot run '{path.name}': {msg}; re-export without the unsupported op")
    return CorruptArtifact(f"'{path}' is not a loadable ONNX/ORT model ({kind}: {msg}); re-export it")


class OrtRunner:
    """An ``onnxruntime.InferenceSession`` behind the Runner interface (named numpy in, named numpy out)."""

    available_for_prediction = True

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        ort = require("onnxruntime", EXTRA)
        self.path = require_file(path, "model file")
        if self.path.is_dir():
            raise BadInput(f"model path '{self.path}' is a folder; pass the .onnx or .ort file")
        options = ort.SessionOptions()
        if threads is not None:
            if int(threads) < 1:
                raise BadInput(f"threads={threads} must be >= 1; pass a positive thread count")
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as exc:  # onnxruntime raises pybind exception types (Fail, InvalidProtobuf, ...)
            raise _load_error(self.path, exc) from exc
        self.threads = threads
        meta_in = self.session.get_inputs()
        self.input_names = [i.name for i in meta_in]
        self.input_types = {i.name: _ORT_TYPES.get(i.type) for i in meta_in}
        self.input_shapes = {i.name: list(i.shape) for i in meta_in}
        self.output_names = [o.name for o in self.session.get_outputs()]
        try:
            self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        except Exception:  # noqa: BLE001 - metadata is optional
            self.metadata = {}

    def _feed(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise BadInput(
                f"inputs {sorted(inputs)} do not match the model's inputs {self.input_names}"
                f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}"
                f"{' (unknown ' + ', '.join(extra) + ')' if extra else ''}; pass exactly the model's input names"
            )
        feed = {}
        for name in self.input_names:
            arr = np.asarray(inputs[name])
            want = self.input_types.get(name)
            if want is not None and arr.dtype != want:
                if np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(want, np.floating):
                    raise BadInput(f"input '{name}' has dtype {arr.dtype} but the model expects {np.dtype(want)}; pass integer data")
                arr = arr.astype(want)
            rank = len(self.input_shapes[name])
            if arr.ndim != rank:
                raise BadInput(f"input '{name}' has shape {arr.shape} (rank {arr.ndim}) but the model expects rank {rank} {self.input_shapes[name]}")
            feed[name] = arr
        return feed

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = self._feed(inputs)
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as exc:
            raise BadInput(f"onnxruntime rejected the inputs for '{self.path.name}': {first_line(exc)}") from exc
        return dict(zip(self.output_names, outputs))

    run = __call__


def ort_runner(path: str | os.PathLike[str], threads: int = 1) -> OrtRunner:
    """Load an .onnx or .ort file into an :class:`OrtRunner` with ``intra_op_num_threads=threads``."""
    return OrtRunner(path, threads=threads)
