"""Compressed checkpoints: model.safetensors + lrcompress.json, written atomically."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, SourceError
from ..methods import registry
from ..paths import atomic_folder, check_output
from .architecture import build_architecture, check_safetensors, quiet_hf

__all__ = ["FORMAT", "MANIFEST", "WEIGHTS", "PICKLED", "atomic_folder", "check_output", "factorized_layers",
           "load", "read_manifest", "save", "versions"]

FORMAT = "lrcompress/1"
MANIFEST = "lrcompress.json"
WEIGHTS = "model.safetensors"
PICKLED = "model.pt"


def factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Manifest entries of the factorized modules (from the method that built each), enough
    to rebuild their shells."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        method = registry.owner(mod)
        if method is not None:
            out[name] = method.entry(mod, groups)
    return out


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Library versions recorded in manifests and reports (plus ``extra`` packages, when installed)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("lrcompress", "transformers", "numpy", "safetensors", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def save(model: nn.Module, out: str | Path, source: dict[str, Any], *, plan: dict[str, Any] | None = None,
         side_files: dict[str, Path] | None = None, extra_files: dict[str, str] | None = None,
         overwrite: bool = False, grids: dict[str, Any] | None = None) -> Path:
    """Write ``out`` atomically: a temporary sibling is filled, then renamed into place. ``grids``: the
    integer grids of quantized parameters (``--budget bytes``), written to ``quant.safetensors``."""
    from safetensors.torch import save_model

    from ..quant.store import GRIDS, grid_entries, write_grids

    with atomic_folder(out, overwrite) as tmp:
        kind = source.get("arch", source).get("kind")
        if kind == "pickle":
            torch.save(model, tmp / PICKLED)
        else:
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for rel, src in (side_files or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for rel, text in (extra_files or {}).items():
            (tmp / rel).write_text(text)
        manifest = {"format": FORMAT, "source": source.get("arch", source), "versions": versions(),
                    "layers": factorized_layers(model), "plan": plan}
        if grids:
            write_grids(grids, tmp / GRIDS)
            manifest["quantization"] = grid_entries(grids)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Path(out)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    p = Path(folder)
    if not (p / MANIFEST).is_file():
        raise CheckpointError(f"{str(p)!r} is not a compressed checkpoint: {MANIFEST} is missing; pass a "
                              "folder written by lrcompress compress")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(p / MANIFEST)!r} is not valid JSON ({e}); re-run lrcompress compress") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(p / MANIFEST)!r} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}; re-run lrcompress compress with this version")
    src, layers = manifest.get("source"), manifest.get("layers", {})
    if not isinstance(src, dict) or "kind" not in src or not isinstance(layers, dict):
        raise CheckpointError(f"{str(p / MANIFEST)!r} lacks a valid 'source' or 'layers' entry; the manifest is "
                              "damaged: re-run lrcompress compress")
    return manifest


DTYPES = ("float32", "float16", "bfloat16", "float64")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_MAX_DIM = 1 << 31


def _shell(info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
    """An uninitialised factorized module from its manifest entry, built by the method that
    reads entries of its kind (``shared``: parts shared between layers, filled as they are built)."""
    method = registry.for_entry(info.get("kind"))
    if method is None:
        raise CheckpointError(f"manifest layer entry {info!r:.120} is damaged or from an unregistered method (no "
                              f"method reads kind {info.get('kind')!r}); register that method, or re-run lrcompress compress")
    try:
        return method.shell(info, shared)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"manifest layer entry {info!r:.120} is damaged ({e}); re-run lrcompress compress") from None


def _check_entry(name: str, info: Any, where: str) -> None:
    """Types and ranges of one manifest layer entry: integers in [0, 2**31], no floats, a float dtype."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: layer {name!r} {why}; the manifest is damaged or edited: re-run "
                               "lrcompress compress")

    if not isinstance(name, str) or not isinstance(info, dict):
        raise bad("is not a name with an entry dict")
    if info.get("dtype", "float32") not in DTYPES:
        raise bad(f"has dtype {info.get('dtype')!r}, not one of {', '.join(DTYPES)}")

    def walk(key: str, v: Any) -> None:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return
        if isinstance(v, int):
            if not 0 <= v <= _MAX_DIM:
                raise bad(f"has {key} = {v}, outside [0, 2**31]")
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(key, x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k, x)
        else:
            raise bad(f"has {key} = {v!r}, not an integer")

    for k, v in info.items():
        walk(k, v)


def check_layers(manifest: dict[str, Any], header: dict[str, Any], where: str) -> None:
    """Check every manifest layer entry against the weights file's header before anything is
    allocated: the shells are built on the meta device and each tensor's shape and dtype must
    be the file's (a tensor the file stores under another name may not be larger than any it holds)."""
    largest = max((math.prod(v.get("shape", [])) for v in header.values()), default=0)
    bases: dict[str, nn.Module] = {}
    for name, info in manifest.get("layers", {}).items():
        _check_entry(name, info, where)
        with torch.device("meta"):
            shell = _shell(info, bases)
        for k, t in shell.state_dict(keep_vars=True).items():
            key = f"{name}.{k}"
            entry = header.get(key)
            if entry is None:
                if t.numel() > largest:
                    raise CheckpointError(f"{where}: layer {name!r} would hold {key} of shape {list(t.shape)}, larger "
                                          "than any tensor in the weights file; the manifest is damaged: re-run "
                                          "lrcompress compress")
                continue
            if list(entry.get("shape", [])) != list(t.shape) or _ST_DTYPES.get(entry.get("dtype")) != t.dtype:
                raise CheckpointError(f"{where}: layer {name!r} gives {key} shape {list(t.shape)} "
                                      f"{str(t.dtype).replace('torch.', '')} but the weights file holds "
                                      f"{entry.get('shape')} {entry.get('dtype')}; the manifest and the weights do "
                                      "not belong together: re-run lrcompress compress")


def _shards(folder: Path) -> list[Path] | None:
    """The shard files of a sharded checkpoint (``model.safetensors.index.json``), checked to
    lie in the folder; None when there is no index."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(index)!r} is not a valid safetensors index ({e}); re-run compress") from None
    for f in files:
        if not isinstance(f, str) or Path(f).name != f or not (folder / f).is_file():
            raise CheckpointError(f"{str(index)!r} names the shard {f!r}, which is not a file in the folder; "
                                  "the checkpoint is incomplete: re-run compress")
    return [folder / f for f in files]


def _load_shards(model: nn.Module, shards: list[Path]) -> None:
    """Fill ``model`` from every shard; every tensor of the model must come from one (tied
    weights count once)."""
    from safetensors.torch import load_file
    expected = model.state_dict()
    loaded: set[str] = set()
    for shard in shards:
        state = load_file(str(shard))
        unknown = sorted(set(state) - set(expected))
        if unknown:
            raise RuntimeError(f"unexpected tensor {unknown[0]!r} in {shard.name}")
        model.load_state_dict(state, strict=False)
        loaded.update(state)
    by_ptr = {expected[k].data_ptr() for k in loaded}
    missing = [k for k, t in expected.items() if k not in loaded and t.data_ptr() not in by_ptr]
    if missing:
        raise RuntimeError(f"missing tensor {missing[0]!r} in the shards")


def load(folder: str | Path, *, trust_pickle: bool = False, trust_code: bool = False,
         with_manifest: bool = False) -> Any:
    """Rebuild the compressed model (and tokenizer, when the folder has one).

    A folder whose architecture comes from a factory runs that code only with ``trust_code``;
    every manifest entry is checked against the weights file before anything is allocated.
    Returns ``(model, tokenizer)``, or ``(model, tokenizer, manifest)`` with ``with_manifest``.
    """

    p = Path(folder)
    manifest = read_manifest(p)
    spec = manifest["source"]
    if spec.get("kind") == "pickle":
        if not trust_pickle:
            raise SourceError(f"{str(p)!r} stores a pickled module ({PICKLED}); loading it can run arbitrary "
                              "code: pass --trust-pickle (trust_pickle=True) if you trust it")
        model = torch.load(str(p / PICKLED), map_location="cpu", weights_only=False)
    else:
        weights = p / WEIGHTS
        shards = _shards(p) if not weights.is_file() else None
        if not weights.is_file() and not shards:
            raise CheckpointError(f"{str(p)!r} has no {WEIGHTS}; the checkpoint is incomplete: re-run compress")
        header: dict[str, Any] = {}
        for w in shards or [weights]:
            header.update(check_safetensors(w))
        check_layers(manifest, header, str(p / MANIFEST))
        model = build_architecture(spec, p, trust_code=trust_code)
        bases: dict[str, nn.Module] = {}
        for name, info in manifest.get("layers", {}).items():
            shell = _shell(info, bases)
            parent_name, _, attr = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name) if parent_name else model
            except AttributeError:
                raise CheckpointError(f"manifest layer {name!r} does not exist in the rebuilt architecture; "
                                      "the folder's files do not belong together") from None
            setattr(parent, attr, shell)
        from safetensors.torch import load_model
        try:
            if shards:
                _load_shards(model, shards)
            else:
                load_model(model, str(weights), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{str(weights)!r} does not match the manifest's architecture "
                                  f"({str(e).splitlines()[0][:160]}); re-run compress") from None
    model.eval()
    tokenizer = None
    if spec.get("kind") == "hf" and (p / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        with quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return (model, tokenizer, manifest) if with_manifest else (model, tokenizer)
