"""Weights brought in one block at a time: the model is built with its parameters on the
meta device (buffers real), and each unit's tensors are read from the checkpoint's
safetensors shards when it is compressed, then released."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import SourceError
from ..io.architecture import check_safetensors, hf_model_class, quiet_hf

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device (no memory), buffers
    (rotary frequencies, position ids) stay real."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(self._parameters[name])
            self._parameters[name] = kind(self._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def shard_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (index, or the single file)."""
    index = folder / INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(f"{str(index)!r} is not a valid safetensors index ({e}); re-save the checkpoint") from None
        files = {f: folder / f for f in set(mapping.values())}
        for f, p in files.items():
            if Path(f).name != f or not p.is_file():
                raise SourceError(f"{str(index)!r} names the shard {f!r}, which is not a file in the folder; "
                                  "the checkpoint is incomplete")
            check_safetensors(p)
        return {k: files[v] for k, v in mapping.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise SourceError(f"{str(folder)!r} has no model.safetensors or {INDEX}; streaming reads safetensors "
                          "checkpoints only: convert the weights or drop --stream")
    return {k: single for k in check_safetensors(single) if k != "__metadata__"}


class LazyCheckpoint:
    """A Hugging Face folder whose model is built on the meta device and filled unit by unit."""

    def __init__(self, folder: Path, compute_dtype: torch.dtype = torch.float32) -> None:
        self.folder, self.compute_dtype = folder, compute_dtype
        self.files = shard_files(folder)
        self.source_dtypes: dict[str, torch.dtype] = {}
        self._prefix = ""

    def build(self) -> nn.Module:
        """The architecture with parameters on the meta device."""
        from transformers import AutoConfig
        try:
            with quiet_hf():
                config = AutoConfig.from_pretrained(str(self.folder), local_files_only=True, trust_remote_code=False)
                cls = hf_model_class(config, None)
                with parameters_on_meta():
                    model = cls.from_config(config, trust_remote_code=False) if hasattr(cls, "from_config") else cls(config)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SourceError(f"cannot build the Hugging Face folder {str(self.folder)!r} ({msg[:200]})") from None
        keys = [k for k, _ in model.named_parameters()]
        prefix = getattr(model, "base_model_prefix", "") or ""
        if keys and keys[0] not in self.files and prefix:
            if f"{prefix}.{keys[0]}" in self.files:
                self._prefix = prefix + "."
        missing = [k for k in keys if self._key(k) not in self.files]
        if missing:
            raise SourceError(f"the checkpoint in {str(self.folder)!r} lacks {len(missing)} tensors of the "
                              f"architecture (first: {missing[0]!r}); config.json and the weights do not belong together")
        return model.eval()

    def _key(self, name: str) -> str:
        return name if name in self.files else self._prefix + name

    def materialize(self, model: nn.Module, names: list[str], recurse: bool = True) -> None:
        """Read the parameters under each of ``names`` (module paths; with ``recurse=False``
        only each module's own) from the checkpoint."""
        from safetensors import safe_open
        wanted: dict[Path, list[tuple[nn.Module, str, str]]] = {}
        for name in names:
            mod = model.get_submodule(name)
            subs = mod.named_modules(prefix=name) if recurse else [(name, mod)]
            for sub_name, sub in subs:
                for pname, p in sub._parameters.items():
                    if p is not None and p.device.type == "meta":
                        key = self._key(f"{sub_name}.{pname}" if sub_name else pname)
                        wanted.setdefault(self.files[key], []).append((sub, pname, key))
        for path, items in wanted.items():
            with safe_open(str(path), framework="pt") as fh:
                for sub, pname, key in items:
                    t = fh.get_tensor(key)
                    self.source_dtypes[key] = t.dtype
                    old = sub._parameters[pname]
                    if tuple(t.shape) != tuple(old.shape):
                        raise SourceError(f"tensor {key!r} in {path.name} has shape {list(t.shape)}, the "
                                          f"architecture expects {list(old.shape)}; the checkpoint does not belong "
                                          "to its config.json")
                    sub._parameters[pname] = nn.Parameter(t.to(self.compute_dtype), requires_grad=False)

    def source_dtype(self) -> torch.dtype:
        """The floating dtype most of the checkpoint's tensors are stored in."""
        from safetensors import safe_open
        counts: dict[torch.dtype, int] = {}
        for path in set(self.files.values()):
            with safe_open(str(path), framework="pt") as fh:
                for k in list(fh.keys())[:64]:
                    sl = fh.get_slice(k)
                    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(sl.get_dtype())
                    if dt is not None:
                        counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def param_bytes(self) -> dict[str, int]:
        """Bytes of every tensor in the compute dtype, by tensor name."""
        from safetensors import safe_open
        out: dict[str, int] = {}
        size = torch.tensor([], dtype=self.compute_dtype).element_size()
        for path in set(self.files.values()):
            with safe_open(str(path), framework="pt") as fh:
                for k in fh.keys():
                    shape = fh.get_slice(k).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    out[k] = n * size
        return out


def release(module: nn.Module) -> None:
    """Drop a unit's parameters back to the meta device (its memory is freed)."""
    for sub in module.modules():
        for pname, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
