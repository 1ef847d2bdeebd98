"""Sharded output of a streaming run, written unit by unit into a resumable partial folder.

The partial folder (``.NAME.lrcompress-partial`` beside the output) holds one safetensors shard
per finished unit, the run's state (``state.json``: fingerprint, finished units, plan, results)
and the activations at the last block boundary. An interrupted run started again with the same
inputs and options resumes after the last finished unit; a finished run renames the folder
into place, so the output path never holds a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError

MARKER = "lrcompress-partial"
STATE = "state.json"
INDEX = "model.safetensors.index.json"


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.{MARKER}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardWriter:
    """Shards, state and boundary activations of one streaming run."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.out, self.fingerprint = out, fingerprint
        self.folder = partial_folder(out)
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "done": [], "shards": {}, "data": {}}
        self.opened = False

    def open(self) -> bool:
        """Create the partial folder, or resume it. Returns True when resuming. A partial
        folder of other inputs or options is replaced."""
        state_file = self.folder / STATE
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                state = {}
            if state.get("fingerprint") == self.fingerprint:
                self.state, self.opened = state, True
                return True
        if self.folder.exists():
            if not (self.folder / MARKER).is_file():
                raise OutputError(f"{str(self.folder)!r} exists and was not made by lrcompress; move it away")
            shutil.rmtree(self.folder)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.folder.mkdir()
            (self.folder / MARKER).write_text("partial output of a streaming lrcompress run; safe to delete\n")
        except OSError as e:
            raise OutputError(f"cannot create {str(self.folder)!r} ({e.strerror or e}); check permissions") from None
        self.opened = True
        self.save_state()
        return False

    def discard(self) -> None:
        """Remove the partial folder of a run that failed before finishing any unit."""
        if self.opened and not self.state["done"] and (self.folder / MARKER).is_file():
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def done(self) -> list[str]:
        return list(self.state["done"])

    def save_state(self) -> None:
        _atomic_write(self.folder / STATE, json.dumps(self.state, indent=1, sort_keys=True))

    def write_unit(self, unit: str, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        """Write one finished unit's tensors as a shard and record it (with ``data``: its
        results) in the state; the boundary activations must be saved before."""
        from safetensors.torch import save_file
        name = f"unit-{len(self.state['done']):05d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        if tensors:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, self.folder / name)
            self.state["shards"][name] = sorted(tensors)
        self.state["done"].append(unit)
        self.state["data"][unit] = data
        self.save_state()

    def save_boundary(self, streams: dict[str, list[torch.Tensor]]) -> None:
        tmp = self.folder / "boundary.pt.tmp"
        torch.save(streams, tmp)
        os.replace(tmp, self.folder / "boundary.pt")

    def load_boundary(self) -> dict[str, list[torch.Tensor]]:
        return torch.load(self.folder / "boundary.pt", weights_only=True)

    def finish(self, files: dict[str, str], side_files: dict[str, Path], overwrite: bool) -> Path:
        """Rename shards to model-0000i-of-0000N.safetensors, write the index and ``files``,
        copy ``side_files``, drop the run's own files, and move the folder into place."""
        shards = sorted(self.state["shards"])
        total = len(shards)
        weight_map: dict[str, str] = {}
        for i, old in enumerate(shards, 1):
            new = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.folder / old, self.folder / new)
            weight_map.update({k: new for k in self.state["shards"][old]})
        size = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
        _atomic_write(self.folder / INDEX, json.dumps({"metadata": {"total_size": size},
                                                       "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        for rel, text in files.items():
            (self.folder / rel).write_text(text)
        for rel, src in side_files.items():
            shutil.copyfile(src, self.folder / rel)
        for f in (STATE, MARKER, "boundary.pt"):
            (self.folder / f).unlink(missing_ok=True)
        shutil.rmtree(self.folder / "spill", ignore_errors=True)
        if self.out.exists():
            if not overwrite:
                raise OutputError(f"output {str(self.out)!r} appeared during the run; pass --overwrite")
            old = self.out.parent / f".{self.out.name}.lrcompress-old"
            os.replace(self.out, old)
            os.replace(self.folder, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.folder, self.out)
        return self.out
