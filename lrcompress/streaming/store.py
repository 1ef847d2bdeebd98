"""Activations at a block boundary, one tensor per calibration batch: in memory up to a byte
cap, memory-mapped from disk beyond it."""

from __future__ import annotations

from pathlib import Path

import torch


class ActivationStore:
    """Per-batch tensors of one activation stream. ``cap``: bytes kept in memory; tensors past
    it are written to ``folder`` and read back memory-mapped."""

    def __init__(self, cap: int | None, folder: Path | None, name: str) -> None:
        self.cap, self.folder, self.name = cap, folder, name
        self._mem: dict[int, torch.Tensor] = {}
        self._disk: dict[int, Path] = {}
        self.in_memory = 0

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def _bytes(self, t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def set(self, i: int, t: torch.Tensor) -> None:
        t = t.detach()
        old = self._mem.pop(i, None)
        if old is not None:
            self.in_memory -= self._bytes(old)
        size = self._bytes(t)
        if self.cap is None or self.folder is None or self.in_memory + size <= self.cap:
            self._mem[i] = t
            self.in_memory += size
            self._disk.pop(i, None)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.name}-{i}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(t.contiguous().clone(), tmp)
        tmp.replace(path)
        self._disk[i] = path

    def get(self, i: int) -> torch.Tensor:
        if i in self._mem:
            return self._mem[i]
        return torch.load(self._disk[i], mmap=True, weights_only=True)

    @property
    def spilled(self) -> int:
        return len(self._disk)

    def tensors(self) -> list[torch.Tensor]:
        return [self.get(i) for i in range(len(self))]

    def drop(self) -> None:
        """Forget every tensor and delete the spilled files."""
        for path in self._disk.values():
            path.unlink(missing_ok=True)
        self._mem.clear()
        self._disk.clear()
        self.in_memory = 0
