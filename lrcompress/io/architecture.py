"""Rebuild a model architecture without its weights: transformers' own classes from a config
(never remote code), torchvision/timm by name, or a factory function, imported and called
under guard (no sys.exit, argv or stdout leaks); and read a safetensors header safely."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import SourceError


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
        return call_factory(target)
    if kind in ("torchvision", "timm"):
        return zoo_model(kind, str(spec.get("name")))
    raise SourceError(f"cannot rebuild an architecture of kind {kind!r}")


def call_factory(target: str) -> nn.Module:
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


def zoo_model(kind: str, name: str) -> nn.Module:
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


def hf_model_class(config: Any, class_name: str | None) -> Any:
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
    cls = hf_model_class(config, class_name)
    with quiet_hf():
        if hasattr(cls, "from_config"):
            return cls.from_config(config, trust_remote_code=False)
        return cls(config)
