"""Causal language models as one interface for perplexity: a torch module (a Hugging Face ``*ForCausalLM`` /
``*LMHeadModel``, a compressed folder of one, or any module mapping token ids to (batch, tokens, vocab) logits)
or an exported ``.onnx`` / ``.ort`` file run by ONNX Runtime (``input_ids`` (+ ``attention_mask``) -> ``logits``).
Each gives next-token logits for one window of token ids, and says what it is when it is not a causal LM."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from exporters.io_spec import call_options, eval_mode
from exporters.torch_runner import TorchRunner, torch_threads

from ..errors import SourceError

__all__ = ["CAUSAL_SUFFIXES", "LanguageModel", "RunnerLM", "TorchLM", "as_language_model", "causal_lm_problem",
           "check_causal", "is_hf_causal_lm", "max_positions"]

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' class names of decoders with an LM head
POSITION_KEYS = ("n_positions", "max_position_embeddings")  # where a config keeps its position limit
PROBE_TOKENS = 8  # length of the causality probe
# relative change of earlier logits when only a later token changes: 0 for an exact causal LM; an int8 model with
# dynamic (per-tensor) activation scales leaks ~1e-2 through the scale of the whole sequence, a model that attends
# to later tokens changes them by far more
PROBE_TOLERANCE = 0.05


class LanguageModel(Protocol):
    """Next-token logits for token ids: ``logits(ids)`` with ``ids`` (1, T) int64 -> (1, T, vocab) float tensor."""

    name: str
    runtime: str
    positions: int | None

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...


def _causal_class_names() -> set[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return set()
    out: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        out.update(v if isinstance(v, (list, tuple)) else [v])
    return out


def _is_hf(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(model).__mro__)


def causal_lm_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be scored as a causal LM (None when it can, as far as its class tells): a
    transformers model must be a causal-LM class (``*ForCausalLM``, ``*LMHeadModel``, one of the auto mapping's);
    any other module is probed when it runs (:class:`TorchLM`)."""
    if not _is_hf(model):
        return None
    name = type(model).__name__
    if name.endswith(CAUSAL_SUFFIXES) or name in _causal_class_names():
        return None
    return (f"is a transformers {name}, a model without a language-model head (not a causal LM): perplexity needs "
            "next-token logits, i.e. a *ForCausalLM / *LMHeadModel checkpoint or its .onnx/.ort export")


def is_hf_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a transformers causal-LM class (a decoder with its LM head)."""
    return isinstance(model, nn.Module) and _is_hf(model) and causal_lm_problem(model) is None


def max_positions(model: nn.Module) -> tuple[int, str] | None:
    """The longest sequence the model's config allows and the config key that says so
    (``n_positions`` / ``max_position_embeddings``), or None when it has no such config."""
    config = getattr(model, "config", None)
    for key in POSITION_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def _logits_of(out: Any, who: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise SourceError(f"{who} returns {type(out).__name__} without logits; perplexity needs a causal LM whose forward "
                      "returns next-token logits (batch, tokens, vocab)")


class TorchLM:
    """A torch module as a :class:`LanguageModel`: called with ``input_ids`` (``use_cache=False`` for a Hugging Face
    decoder, which returns no KV cache), in eval mode and without gradients; ``threads``: torch's thread count
    during a call, restored after it."""

    runtime = "torch"

    def __init__(self, model: nn.Module, name: str, threads: int | None = None) -> None:
        problem = causal_lm_problem(model)
        if problem:
            raise SourceError(f"{name!r} {problem}")
        self.model, self.name, self.threads = model, name, threads
        self.options = call_options(model)
        self.hf = _is_hf(model)
        limit = max_positions(model)
        self.positions, self.position_key = (limit if limit else (None, None))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.model), torch_threads(self.threads), torch.no_grad():
            out = self.model(input_ids=ids, **self.options) if self.hf else self.model(ids, **self.options)
        return _logits_of(out, repr(self.name))


class RunnerLM:
    """An ONNX Runtime session (an ``exporters`` runner, or an ``onnxruntime.InferenceSession``) of an exported causal
    LM as a :class:`LanguageModel`: fed ``input_ids`` (1, T) int64, ``attention_mask`` of ones and ``position_ids``
    0..T-1 where the graph takes them; reads the ``logits`` output (or its only output). Its position limit is
    the ``max_positions`` the exporter stored in the file's metadata, when there is one."""

    runtime = "onnxruntime"
    positions = None
    position_key = None
    FED = ("input_ids", "attention_mask", "position_ids")

    def __init__(self, runner: Any, name: str) -> None:
        if hasattr(runner, "get_inputs") and hasattr(runner, "run") and not hasattr(runner, "input_names"):
            runner = _SessionRunner(runner)
        self.runner, self.name = runner, name
        names = list(getattr(runner, "input_names", []) or [])
        outputs = list(getattr(runner, "output_names", []) or [])
        if "input_ids" not in names or any(n not in self.FED for n in names):
            raise SourceError(f"{name!r} takes inputs {names}, not input_ids (+ attention_mask, position_ids): it is not "
                              "the export of a causal LM; export a *ForCausalLM model with lrcompress export")
        if "logits" not in outputs and len(outputs) != 1:
            raise SourceError(f"{name!r} has outputs {outputs} and none is 'logits': it is not the export of a causal "
                              "LM (an encoder gives hidden states); export a *ForCausalLM model")
        self.inputs, self.output = names, ("logits" if "logits" in outputs else outputs[0])
        meta = getattr(runner, "metadata", None) or {}
        if str(meta.get("max_positions", "")).isdigit() and int(meta["max_positions"]) > 0:
            self.positions, self.position_key = int(meta["max_positions"]), "max_positions in the file's metadata"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        arr = ids.numpy().astype(np.int64)
        feed = {"input_ids": arr, "attention_mask": np.ones_like(arr),
                "position_ids": np.broadcast_to(np.arange(arr.shape[1], dtype=np.int64), arr.shape).copy()}
        out = self.runner({k: feed[k] for k in self.inputs})[self.output]
        return torch.from_numpy(np.asarray(out))


class _SessionRunner:
    """A bare ``onnxruntime.InferenceSession`` behind the runner interface (named numpy in, named numpy out)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        try:
            self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        except Exception:  # noqa: BLE001 - metadata is optional
            self.metadata = {}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(inputs))))


def as_language_model(model: Any, name: str, *, threads: int | None = None) -> TorchLM | RunnerLM:
    """``model`` as a :class:`LanguageModel`: a torch module (or an ``exporters.TorchRunner`` of one), an ONNX
    Runtime runner or session, or the path of an ``.onnx`` / ``.ort`` file (loaded with ``threads``)."""
    if isinstance(model, (TorchLM, RunnerLM)):
        return model
    if isinstance(model, TorchRunner):
        return TorchLM(model.model, name, threads if threads is not None else model.threads)
    if isinstance(model, nn.Module):
        return TorchLM(model, name, threads)
    if isinstance(model, (str, os.PathLike)):
        import exporters
        p = Path(model)
        exp = exporters.exporter_for_path(str(p))
        if exp.runtime != "onnxruntime":
            raise SourceError(f"{str(p)!r} is a {exp.name} artifact; perplexity runs torch models and .onnx/.ort "
                              "files on ONNX Runtime: pass the model's folder or its ONNX export")
        return RunnerLM(exp.load(p, threads=threads), name)
    if (callable(model) and hasattr(model, "input_names")) or hasattr(model, "get_inputs"):
        return RunnerLM(model, name)
    raise SourceError(f"{name!r} is a {type(model).__name__}; pass a torch causal LM, an ONNX Runtime session of one "
                      "or the path of its .onnx/.ort export")


def check_causal(lm: TorchLM | RunnerLM, ids: torch.Tensor) -> int:
    """Run ``lm`` on the probe ``ids`` (1, T) and on the same ids with the last one changed; return the vocabulary
    size (the logits' last axis). A :class:`SourceError` when the logits are not (1, T, vocab) or when an earlier
    position's logits change with the last token (an encoder or masked LM sees later tokens and cannot be scored
    by next-token likelihood)."""
    a = ids.reshape(1, -1)
    n = a.shape[1]
    b = a.clone()
    last = int(a[0, -1])
    b[0, -1] = last - 1 if last > 0 else 1
    la, lb = lm.logits(a).float(), lm.logits(b).float()
    if la.dim() != 3 or tuple(la.shape[:2]) != (1, n) or la.shape[-1] < 2:
        raise SourceError(f"{lm.name!r} gives an output of shape {list(la.shape)} for {n} tokens, not next-token logits "
                          f"(1, {n}, vocab): it is not a causal LM; pass a *ForCausalLM model or its ONNX export")
    if n > 1:
        early_a, early_b = la[0, :-1], lb[0, :-1]
        change = float((early_a - early_b).norm() / early_a.norm().clamp_min(1e-12))
        if not change <= PROBE_TOLERANCE:
            raise SourceError(f"{lm.name!r} is not causal: its logits at earlier positions change (relative {change:.2g}) "
                              "when only the last token changes, so it sees later tokens (an encoder or masked LM); "
                              "perplexity needs a causal LM")
    return int(la.shape[-1])
