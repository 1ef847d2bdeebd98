"""Compressed checkpoints: model.safetensors + lrcompress.json, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .errors import CheckpointError, OutputError, SourceError
from .layers import LowRankConv1x1, LowRankEmbedding, LowRankLinear, build_shell

FORMAT = "lrcompress/1"
MANIFEST = "lrcompress.json"
WEIGHTS = "model.safetensors"
PICKLED = "model.pt"


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse output paths that cannot be (re)written, before any work is done."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {str(p)!r} is an existing file; choose a folder path with -o")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"output folder {str(p)!r} is not empty; pass --overwrite or choose another -o")
    probe = p.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {str(p)!r}: {str(probe)!r} is a file, not a folder; choose another -o")
    try:
        tempfile.TemporaryDirectory(prefix=".lrcompress-probe-", dir=probe).cleanup()
    except OSError as e:
        raise OutputError(f"cannot write under {str(probe)!r} ({e.strerror or e}); choose a writable -o") from None
    return p


def _missing_parents(p: Path) -> list[Path]:
    """Ancestors of ``p`` that do not exist yet, deepest first."""
    out = []
    q = p.resolve().parent
    while not q.exists():
        out.append(q)
        q = q.parent
    return out


def factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shapes and ranks of the factorized modules, enough to rebuild their shells."""
    out: dict[str, dict[str, Any]] = {}
    bases: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod).__name__ == "SharedBasisLinear":
            from .shared import shared_info
            gid = bases.setdefault(id(mod.basis), f"g{len(bases)}")
            out[name] = shared_info(mod, gid)
            continue
        if isinstance(mod, LowRankLinear):
            out[name] = {"kind": "linear", "shape": [mod.out_features, mod.in_features],
                         "rank": mod.rank, "bias": mod.second.bias is not None,
                         "dtype": str(mod.first.weight.dtype).replace("torch.", "")}
        elif isinstance(mod, LowRankConv1x1):
            out[name] = {"kind": "conv1x1", "shape": [mod.out_channels, mod.in_channels],
                         "rank": mod.rank, "bias": mod.second.bias is not None,
                         "stride": list(mod.first.stride), "padding": list(mod.first.padding),
                         "dtype": str(mod.first.weight.dtype).replace("torch.", "")}
        elif type(mod).__name__ in ("TuckerConv2d", "CPConv2d"):
            from .conv_layers import conv_shell_info
            out[name] = dict(conv_shell_info(mod), dtype=str(mod.last.weight.dtype).replace("torch.", ""))
        elif type(mod).__name__ == "TTLinear":
            from .tt_layers import tt_shell_info
            out[name] = tt_shell_info(mod)
        elif isinstance(mod, LowRankEmbedding):
            out[name] = {"kind": "embedding", "shape": [mod.num_embeddings, mod.embedding_dim],
                         "rank": mod.rank, "padding_idx": mod.padding_idx,
                         "dtype": str(mod.table.weight.dtype).replace("torch.", "")}
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


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it is renamed into place
    (replacing an old folder only after the new one is complete), on any failure it and the
    parent folders this call created are removed, so nothing half-written is left."""
    out = check_output(out, overwrite)
    created = _missing_parents(out)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; only folders this call made, and only if empty
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise OutputError(f"writing {str(out)!r} failed ({e.strerror or e}); check free space and "
                              "permissions") from None
        raise


def save(model: nn.Module, out: str | Path, source: dict[str, Any], *, plan: dict[str, Any] | None = None,
         side_files: dict[str, Path] | None = None, extra_files: dict[str, str] | None = None,
         overwrite: bool = False) -> Path:
    """Write ``out`` atomically: a temporary sibling is filled, then renamed into place."""
    from safetensors.torch import save_model

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


def _shell(info: dict[str, Any], bases: dict[str, nn.Module]) -> nn.Module:
    """An uninitialised factorized module from its manifest entry (``bases``: shared bases
    by group id, filled as the group's members are rebuilt)."""
    kind = info.get("kind")
    dtype = getattr(torch, info.get("dtype", "float32"))
    try:
        if kind == "shared_linear":
            from .shared import build_shared_shell
            return build_shared_shell(info, bases)
        if kind in ("tucker", "cp"):
            from .conv_layers import build_conv_shell
            return build_conv_shell(kind, info, dtype=dtype)
        if kind == "tt_linear":
            from .tt_layers import build_tt_shell
            return build_tt_shell(info)
        return build_shell(kind, info["shape"], info["rank"], bias=info.get("bias", False),
                           padding_idx=info.get("padding_idx"), dtype=dtype, info=info)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"manifest layer entry {info!r:.120} is damaged ({e}); re-run lrcompress compress") from None


def load(folder: str | Path, *, trust_pickle: bool = False, with_manifest: bool = False) -> Any:
    """Rebuild the compressed model (and tokenizer, when the folder has one).

    Returns ``(model, tokenizer)``, or ``(model, tokenizer, manifest)`` with ``with_manifest``.
    """
    from .sources import build_architecture, check_safetensors

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
        if not weights.is_file():
            raise CheckpointError(f"{str(p)!r} has no {WEIGHTS}; the checkpoint is incomplete: re-run compress")
        check_safetensors(weights)
        model = build_architecture(spec, p)
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
            load_model(model, str(weights), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{str(weights)!r} does not match the manifest's architecture "
                                  f"({str(e).splitlines()[0][:160]}); re-run compress") from None
    model.eval()
    tokenizer = None
    if spec.get("kind") == "hf" and (p / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from .sources import quiet_hf
        with quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return (model, tokenizer, manifest) if with_manifest else (model, tokenizer)
