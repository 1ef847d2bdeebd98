"""Inputs for calibration and evaluation: text through a tokenizer, or stored tensors."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import DataError, DataWarning

TENSOR_SUFFIXES = (".npy", ".npz", ".safetensors")
MAX_TEXT_BYTES = 256 * 2**20  # a text data file larger than this is refused (not read without bound)


POSITIONAL = "input"  # the one name of a single positional input, here and in exporters (io_spec.SINGLE_INPUT)


def is_positional(inputs: dict[str, Any]) -> bool:
    """Whether ``inputs`` is one positional tensor (a .npy file, a plain tensor) rather than keywords."""
    return list(inputs) == [POSITIONAL]


@dataclass
class Batch:
    """One model call: keyword inputs (or one positional tensor under ``POSITIONAL``) and the
    token mask (B x T, True = real token) used to drop padding from statistics."""

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()},
                     None if self.mask is None else self.mask.to(device))

    def run(self, model: torch.nn.Module) -> Any:
        if is_positional(self.inputs):
            return model(self.inputs[POSITIONAL])
        return model(**self.inputs)


def check_data_file(path: str | Path, hint: str) -> Path:
    """An existing regular file: not a folder, a device (/dev/zero) or a FIFO, which would be
    read without bound or block."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist; {hint}")
    if p.is_dir():
        raise DataError(f"data path {str(p)!r} is a folder; {hint}")
    if not p.is_file():
        raise DataError(f"data path {str(p)!r} is not a regular file (a device, FIFO or socket); {hint}")
    return p


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-blank lines of a UTF-8 text file (one example per line), at most MAX_TEXT_BYTES."""
    p = check_data_file(path, "pass a text file with one example per line")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_TEXT_BYTES + 1)
        if len(raw) > MAX_TEXT_BYTES:
            raise DataError(f"data file {str(p)!r} is larger than the {MAX_TEXT_BYTES:,}-byte limit for text data; "
                            "pass a smaller sample of lines (calibration needs hundreds, not millions)")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(p)!r} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"data file {str(p)!r} has no non-blank lines; it needs one example per line")
    if limit is not None:
        if limit < 1:
            raise DataError(f"--calib-samples {limit} must be >= 1; e.g. --calib-samples 256")
        lines = lines[:limit]
    return lines


def with_pad_token(tokenizer: Any) -> Any:
    """``tokenizer``, or for one without a padding token (GPT-2's) a copy that pads with its
    end-of-text (or unknown) token; padded positions are masked out of every statistic. The
    caller's tokenizer is left as it is."""
    if tokenizer is None or getattr(tokenizer, "pad_token", "") is not None:
        return tokenizer
    fill = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
    if fill is None:
        raise DataError("the tokenizer has no padding, end-of-text or unknown token to pad a batch of lines with; "
                        "pass token ids (.npz with input_ids and attention_mask)")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = fill
    return tokenizer


class TextData:
    """Lines of text tokenized with the model's tokenizer, padded per batch, mask kept."""

    def __init__(self, lines: list[str], tokenizer: Any, max_length: int = 128) -> None:
        if max_length < 1:
            raise DataError(f"--max-length {max_length} must be >= 1; e.g. --max-length 128")
        if not lines:
            raise DataError("no text examples given; pass a file with at least one non-blank line")
        self.lines, self.tokenizer, self.max_length = lines, with_pad_token(tokenizer), max_length

    def __len__(self) -> int:
        return len(self.lines)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.lines), batch_size):
            enc = self.tokenizer(self.lines[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            inputs = {k: v for k, v in enc.items()}
            mask = inputs.get("attention_mask")
            yield Batch(inputs, None if mask is None else mask.bool())


class TensorData:
    """Stored input tensors: first dimension = examples. One array is passed positionally;
    named arrays (.npz/.safetensors) are passed as keyword arguments."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str = "tensors") -> None:
        if not arrays:
            raise DataError(f"{source} holds no arrays; save the model inputs with first dim = examples")
        if "" in arrays:  # the old spelling of the positional input
            if POSITIONAL in arrays:
                raise DataError(f"{source} names the positional input both '' and {POSITIONAL!r}; keep one")
            arrays = {POSITIONAL if k == "" else k: v for k, v in arrays.items()}
        sizes = {k: (a.shape[0] if a.ndim else 0) for k, a in arrays.items()}
        for k, a in arrays.items():
            if a.ndim == 0 or a.shape[0] == 0:
                raise DataError(f"array {k!r} in {source} has shape {a.shape}; it needs a "
                                "first dimension of examples (N, ...) with N >= 1")
            if a.ndim == 1:
                raise DataError(f"array {k!r} in {source} has shape {a.shape}: one axis cannot hold both "
                                f"examples and features; save it as (N, features), e.g. x.reshape(1, {a.shape[0]}) "
                                f"for one example or x.reshape({a.shape[0]}, 1) for {a.shape[0]} scalars")
            if a.dtype.kind not in "fiub":
                raise DataError(f"array {k!r} in {source} has dtype {a.dtype}; inputs must "
                                "be float, int or bool arrays")
            if a.dtype.kind == "f":
                finite = np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
                if not finite.all():
                    bad = np.flatnonzero(~finite)
                    raise DataError(f"array {k!r} in {source} has NaN/Inf values in {len(bad)} of "
                                    f"{a.shape[0]} examples (first: example {int(bad[0])}); inputs must be finite: "
                                    "clean or drop those examples")
        if len(set(sizes.values())) != 1:
            raise DataError(f"arrays in {source} disagree on the number of examples {sizes}; "
                            "give every input the same first dimension")
        self.arrays, self.source = arrays, source
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def limit(self, n: int) -> "TensorData":
        return TensorData({k: a[:n] for k, a in self.arrays.items()}, self.source)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, self.n, batch_size):
            inputs = {}
            for k, a in self.arrays.items():
                t = torch.from_numpy(np.ascontiguousarray(a[i:i + batch_size]))
                if t.dtype == torch.float64 or t.dtype == torch.float16:
                    t = t.float()
                inputs[k] = t
            mask = inputs.get("attention_mask")
            yield Batch(inputs, mask.bool() if mask is not None and mask.dim() == 2 else None)


def read_tensors(path: str | Path) -> TensorData:
    """Load .npy (one positional input), .npz or .safetensors (named inputs)."""
    p = check_data_file(path, "pass a .npy/.npz/.safetensors file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return TensorData({POSITIONAL: np.load(p, allow_pickle=False)}, str(p))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return TensorData({k: z[k] for k in z.files}, str(p))
        if suffix == ".safetensors":
            from safetensors.numpy import load_file
            return TensorData(dict(load_file(str(p))), str(p))
    except DataError:
        raise
    except Exception as e:  # corrupt file: numpy/safetensors raise many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read tensors from {str(p)!r} ({msg}); re-save it with numpy or safetensors") from None
    raise DataError(f"data file {str(p)!r} has suffix {suffix!r}; use a .txt file or one of {TENSOR_SUFFIXES}")


def open_data(path: str | Path, tokenizer: Any | None, max_length: int = 128,
              limit: int | None = None) -> TextData | TensorData:
    """Text file -> TextData (needs a tokenizer); tensor file -> TensorData."""
    p = Path(path)
    if p.suffix.lower() in TENSOR_SUFFIXES:
        data = read_tensors(p)
        if limit is not None:
            if limit < 1:
                raise DataError(f"--calib-samples {limit} must be >= 1; e.g. --calib-samples 256")
            data = data.limit(limit)
        return data
    lines = read_lines(p, limit)
    if tokenizer is None:
        raise DataError(f"data file {str(p)!r} is text but the model has no tokenizer; pass input "
                        f"tensors as one of {TENSOR_SUFFIXES}")
    warn_empty_lines(lines, tokenizer, str(p))
    return TextData(lines, tokenizer, max_length)


def warn_empty_lines(lines: list[str], tokenizer: Any, source: str) -> int:
    """Warn (DataWarning) when lines tokenize to nothing but special tokens; returns how many."""
    import warnings
    try:
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer without batch/keyword support: nothing to check here
        return 0
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    empty = [i for i, row in enumerate(ids) if all(t in special for t in row)]
    if empty:
        warnings.warn(f"{len(empty)} of {len(lines)} lines of {source} tokenize to special tokens only (first: "
                      f"line {empty[0] + 1} of the non-blank lines, {lines[empty[0]][:40]!r}); they add nothing "
                      "to the statistics", DataWarning, stacklevel=3)
    return len(empty)
