"""Sliding-window perplexity of causal language models, the protocol of the field's WikiText-2 tables (Hugging Face,
"Perplexity of fixed-length models"): the text is tokenized once as one stream; windows of ``seq_len`` tokens start
every ``stride`` tokens; in each window only the tokens the previous window did not reach are scored, each from
the tokens before it inside the window (so the first token of a window is never a target); perplexity is
``exp`` of the negative log-likelihood averaged over all scored tokens.

``stride == seq_len`` (the default) is the non-overlapping protocol of GPTQ / SVD-LLM / ASVD tables: every window
scores ``seq_len - 1`` tokens. ``stride < seq_len`` scores every token after the first exactly once, each with at
least ``seq_len - stride`` tokens of context, for ``seq_len / stride`` times the compute.

Several models are scored on the same windows; the first is the reference: each other model's perplexity ratio
and next-token top-1 agreement (its argmax equals the reference's, over the scored tokens) are given against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..io.architecture import quiet_hf
from ..io.data import MAX_TEXT_BYTES, TENSOR_SUFFIXES, TensorData, TextData, check_data_file, read_tensors
from .lm import LanguageModel, as_language_model, check_causal

__all__ = ["DEFAULT_MAX_SEQ_LEN", "ModelPerplexity", "PerplexityReport", "check_window_options", "check_windows",
           "data_tokens", "default_seq_len", "perplexity", "plan_windows", "read_text", "text_tokens", "tokenize",
           "windows"]

DEFAULT_MAX_SEQ_LEN = 1024  # default window: the model's positions, at most this (GPT-2's context)
CHUNK = 256  # scored positions whose log-softmax is taken at once, in float64

Progress = Callable[[str, int, int], None]


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over ``n_tokens`` tokens as ``(begin, end, first)``: the window holds tokens ``[begin, end)`` and
    scores targets ``[first, end)`` (those the previous window did not reach; never its own first token). Windows
    that would score nothing (a last window of one token) are left out."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file as it is (at most ``MAX_TEXT_BYTES``): a :class:`DataError` for a missing
    file, a folder or device, binary content (NUL bytes or not UTF-8) and a file with only whitespace."""
    p = check_data_file(path, "pass a UTF-8 text file (e.g. the WikiText-2 test split) or token ids (.npz with input_ids)")
    with open(p, "rb") as fh:
        raw = fh.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise DataError(f"text file {str(p)!r} is larger than the {MAX_TEXT_BYTES:,}-byte limit; pass a smaller part "
                        "of it (--max-tokens stops early, but the file is read whole)")
    if b"\x00" in raw:
        raise DataError(f"text file {str(p)!r} holds NUL bytes: it is binary, not text; pass a UTF-8 text file or "
                        "token ids as .npz with input_ids")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                        "or pass token ids as .npz with input_ids") from None
    if not text.strip():
        raise DataError(f"text file {str(p)!r} is empty (only whitespace); pass the text to score")
    return text


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """``text`` tokenized once, as one stream (the tokenizer's special tokens included, as its call adds them)."""
    with quiet_hf():  # "sequence longer than the model's maximum": windows take care of that
        ids = tokenizer(text)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _tensor_tokens(data: TensorData) -> torch.Tensor:
    arrays = data.arrays
    ids = arrays.get("input_ids", arrays.get("input"))
    if ids is None or ids.dtype.kind not in "iu":
        raise DataError(f"{data.source} holds {sorted(arrays)}, no integer input_ids; save the token ids as "
                        "np.savez(FILE, input_ids=ids) (rows are joined into one stream; attention_mask drops padding)")
    mask = arrays.get("attention_mask")
    flat = ids[mask.astype(bool)] if mask is not None and mask.shape == ids.shape else ids.reshape(-1)
    if flat.size and flat.min() < 0:
        raise DataError(f"{data.source} has negative token ids (min {int(flat.min())}); pass the tokenizer's ids")
    return torch.from_numpy(np.ascontiguousarray(flat).astype(np.int64))


def text_tokens(path: str | Path, tokenizer: Any | None) -> torch.Tensor:
    """The token stream of a data file: a text file read whole and tokenized once, or token ids from
    .npz/.npy/.safetensors (``input_ids`` rows joined, padding dropped by ``attention_mask``)."""
    if Path(path).suffix.lower() in TENSOR_SUFFIXES:
        return _tensor_tokens(read_tensors(path))
    text = read_text(path)
    if tokenizer is None:
        raise DataError(f"{str(path)!r} is text but no model source has a tokenizer; pass --tokenizer FOLDER or token "
                        f"ids ({', '.join(TENSOR_SUFFIXES)} with input_ids)")
    return tokenize(text, tokenizer)


def data_tokens(data: TextData | TensorData) -> torch.Tensor:
    """The token stream of loaded validation data: text lines joined by newlines and tokenized once, or the
    ``input_ids`` rows of tensor data joined without their padding."""
    if isinstance(data, TextData):
        return tokenize("\n".join(data.lines), data.tokenizer)
    return _tensor_tokens(data)


def default_seq_len(models: Mapping[str, Any]) -> int | None:
    """The default window: the fewest positions any model's config allows, at most ``DEFAULT_MAX_SEQ_LEN``; None
    when no model says (ONNX files only)."""
    known = [lm.positions for lm in models.values() if getattr(lm, "positions", None)]  # type: ignore[union-attr]
    return min([DEFAULT_MAX_SEQ_LEN, *known]) if known else None


@dataclass
class ModelPerplexity:
    """One model's figures: ``ppl`` = exp(``nll``), ``nll`` in nats per scored token; ``ratio`` and
    ``top1_agreement`` against the reference (None for the reference itself)."""

    name: str
    runtime: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    seconds: float
    ratio: float = 1.0
    top1_agreement: float | None = None
    reference: bool = False


@dataclass
class PerplexityReport:
    """Perplexity of several models on one token stream with the same windows; ``models[0]`` is the reference."""

    text: str
    tokens: int
    seq_len: int
    stride: int
    scored: int
    windows: int
    models: list[ModelPerplexity] = field(default_factory=list)

    def by_name(self, name: str) -> ModelPerplexity:
        return next(m for m in self.models if m.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("text", "tokens", "seq_len", "stride", "scored", "windows")},
                "protocol": "sliding window, stride == seq_len: non-overlapping" if self.stride == self.seq_len
                else "sliding window, only tokens new to each window scored",
                "reference": self.models[0].name if self.models else None,
                "models": [asdict(m) for m in self.models]}

    def table(self) -> str:
        kind = "non-overlapping" if self.stride == self.seq_len else f"stride {self.stride}"
        w = max([5, *(len(m.name) for m in self.models)])
        lines = [(f"perplexity on {self.text}: {self.tokens:,} tokens, windows of {self.seq_len} ({kind}), "
                  f"{self.windows} windows, {self.scored:,} tokens scored"),
                 f"{'model':{w}} {'runtime':11} {'ppl':>12} {'ratio':>8} {'top1':>7} {'tokens':>9} {'seconds':>8}"]
        for m in self.models:
            top1 = "ref" if m.reference else ("-" if m.top1_agreement is None else f"{m.top1_agreement:.4f}")
            lines.append(f"{m.name:{w}} {m.runtime:11} {m.ppl:12.4f} {m.ratio:8.4f} {top1:>7} {m.tokens:9,} "
                         f"{m.seconds:8.2f}")
        return "\n".join(lines)


def check_window_options(seq_len: int | None, stride: int | None) -> None:
    """Refuse a window below 2 tokens and a stride outside [1, seq_len] (None: not given yet)."""
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ConfigError(f"--seq-len {seq_len!r} must be an integer >= 2 (a window scores its tokens after the first); "
                          "e.g. --seq-len 1024")
    if stride is None:
        return
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or (seq_len is not None and stride > seq_len):
        if seq_len is None:
            raise ConfigError(f"--stride {stride!r} must be an integer >= 1 (and at most --seq-len); e.g. --stride 512")
        raise ConfigError(f"--stride {stride!r} must be an integer in [1, --seq-len {seq_len}]: a larger stride leaves "
                          f"tokens no window scores; give --stride {seq_len} (non-overlapping) or e.g. {max(seq_len // 2, 1)}")


def check_windows(n_tokens: int, seq_len: int, stride: int, where: str = "the text") -> None:
    """:func:`check_window_options`, and refuse a text shorter than one window plus one token."""
    check_window_options(seq_len, stride)
    if n_tokens < seq_len + 1:
        fix = f"or --seq-len {n_tokens - 1} or less" if n_tokens > 2 else "(it needs at least 3 tokens)"
        raise DataError(f"{where} has {n_tokens:,} tokens, fewer than one window of --seq-len {seq_len} plus one token "
                        f"({seq_len + 1:,}); pass a longer text {fix}")


def plan_windows(lms: Iterable[LanguageModel], n_tokens: int, seq_len: int | None, stride: int | None,
                 text: str = "the text") -> tuple[int, int]:
    """``(seq_len, stride)`` with their defaults filled (:func:`default_seq_len`; stride = seq_len), checked
    against the text's length (:func:`check_windows`) and every model's positions."""
    lms = list(lms)
    if seq_len is None:
        seq_len = default_seq_len({lm.name: lm for lm in lms})
        if seq_len is None:
            raise ConfigError("no model says how many positions it takes (.onnx/.ort files without that metadata); "
                              "pass --seq-len, e.g. --seq-len 1024 (at most the exported model's positions)")
    stride = seq_len if stride is None else stride
    check_windows(n_tokens, seq_len, stride, text)
    for lm in lms:
        if lm.positions is not None and seq_len > lm.positions:
            key = lm.position_key if " " in str(lm.position_key) else f"config.{lm.position_key}"
            raise ConfigError(f"--seq-len {seq_len} is beyond the {lm.positions} positions of {lm.name!r} "
                              f"({key}); pass --seq-len {lm.positions} or less")
    return seq_len, stride


def perplexity(models: Mapping[str, Any], tokens: torch.Tensor | np.ndarray | list[int], *, seq_len: int | None = None,
               stride: int | None = None, max_tokens: int | None = None, text: str = "the token stream",
               threads: int | None = None, progress: Progress | None = None) -> PerplexityReport:
    """Sliding-window perplexity of each of ``models`` (name -> torch causal LM, ONNX Runtime runner/session, or
    .onnx/.ort path; the first is the reference) on the token stream ``tokens``.

    ``seq_len``: window (default: the fewest positions any model's config allows, at most 1024; required when
    no model says); ``stride``: step between windows (default ``seq_len``: non-overlapping); ``max_tokens``: use
    only the first tokens of the stream; ``text``: what the tokens are, for the report. Raises ConfigError /
    DataError / SourceError for a bad window, a short text, a model beyond its positions or not a causal LM."""
    if not models:
        raise ConfigError("no model given; pass at least one causal LM (the first is the reference)")
    stream = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).reshape(-1).long()
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 3:
            raise ConfigError(f"--max-tokens {max_tokens!r} must be an integer >= 3; e.g. --max-tokens 100000")
        if len(stream) > max_tokens:
            stream, text = stream[:max_tokens], f"{text} (its first --max-tokens {max_tokens})"
    lms = {name: as_language_model(m, name, threads=threads) for name, m in models.items()}
    seq_len, stride = plan_windows(lms.values(), len(stream), seq_len, stride, text)
    if len(stream) and int(stream.min()) < 0:
        raise DataError(f"{text} has negative token ids (min {int(stream.min())}); pass the tokenizer's ids")
    probe = stream[: min(8, seq_len)].reshape(1, -1)
    top = int(stream.max()) if len(stream) else 0
    for lm in lms.values():
        vocab = check_causal(lm, probe)
        if top >= vocab:
            raise DataError(f"{text} has token id {top} but {lm.name!r} has a vocabulary of {vocab}; the tokenizer does "
                            "not belong to the model: use the model's own tokenizer (or --tokenizer of its folder)")
    wins = windows(len(stream), seq_len, stride)
    report = PerplexityReport(text=text, tokens=len(stream), seq_len=seq_len, stride=stride,
                              scored=sum(e - f for _, e, f in wins), windows=len(wins))
    ref_pred: list[torch.Tensor] = []
    for i, lm in enumerate(lms.values()):
        report.models.append(_score(lm, stream, wins, ref_pred if i == 0 else None, None if i == 0 else ref_pred,
                                    progress))
    ref = report.models[0]
    ref.reference = True
    for m in report.models[1:]:
        m.ratio = m.ppl / ref.ppl if ref.ppl > 0 and math.isfinite(ref.ppl) else math.nan
    return report


def _score(lm: LanguageModel, stream: torch.Tensor, wins: list[tuple[int, int, int]], keep: list[torch.Tensor] | None,
           ref: list[torch.Tensor] | None, progress: Progress | None) -> ModelPerplexity:
    """Sum of the negative log-likelihoods of one model over the windows (float64), its argmax predictions kept
    (``keep``: the reference) or compared with the reference's (``ref``)."""
    nll, agree, count = 0.0, 0, 0
    start = time.perf_counter()
    for w, (begin, end, first) in enumerate(wins):
        logits = lm.logits(stream[begin:end].reshape(1, -1))[0]
        for lo in range(first, end, CHUNK):  # targets lo..hi-1 are predicted by positions lo-1..hi-2
            hi = min(lo + CHUNK, end)
            rows = logits[lo - 1 - begin: hi - 1 - begin].double()
            target = stream[lo:hi]
            nll += float(F.cross_entropy(rows, target, reduction="sum"))
            pred = rows.argmax(-1)
            if keep is not None:
                keep.append(pred)
            if ref is not None:
                agree += int((pred == ref[count]).sum())
            count += 1
        if progress is not None:
            progress(lm.name, w + 1, len(wins))
    seconds = time.perf_counter() - start
    scored = sum(e - f for _, e, f in wins)
    mean = nll / scored
    total = sum(len(p) for p in ref) if ref is not None else 0
    ppl = math.nan if math.isnan(mean) else (math.exp(mean) if mean < 700 else math.inf)
    return ModelPerplexity(name=lm.name, runtime=lm.runtime, ppl=ppl,
                           nll=mean, tokens=scored, windows=len(wins), seconds=round(seconds, 3),
                           top1_agreement=(agree / total) if ref is not None and total else None)
