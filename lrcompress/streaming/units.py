"""The units of block-sequential compression: the model's repeated block list, views that
hold one unit's modules at their full dotted names, and batches that run one unit.

A *unit* is one block (``encoder.layer.3``), or the target layers that run before the first
block (``pre``: embeddings) or after the last (``post``: a pooler, an LM head). Planning,
calibration and factorization run on a *view*: a module tree holding only the unit's modules
at their full names, so the existing planner and hooks work unchanged and every name in the
plan is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..io.data import Batch
from ..planning.targets import _matches


class StopForward(BaseException):
    """Raised by the catcher at the first block to end a forward pass early (a BaseException,
    so no ``except Exception`` on the way swallows it)."""


def find_blocks(model: nn.Module, pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's repeated block list: the ``ModuleList`` named by ``pattern`` (exact name,
    glob or ``re:``), else the one of two or more same-class modules holding most parameters."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if pattern is not None:
        hits = [(n, m) for n, m in lists if _matches(pattern, n)]
        if len(hits) != 1:
            names = ", ".join(n for n, _ in lists) or "none"
            raise ConfigError(f"--blocks {pattern!r} matches {len(hits)} module lists (there are: {names}); "
                              "name exactly one, e.g. --blocks model.layers")
        return hits[0]

    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    same = [(n, m) for n, m in lists if len(m) >= 2 and len({type(c) for c in m}) == 1]
    if not same:
        raise ConfigError("no repeated block list found (a ModuleList of two or more modules of one class); "
                          "name it with --blocks PATTERN or use --calibration open without blocks")
    return max(same, key=lambda nm: size(nm[1]))


def block_names(prefix: str, blocks: nn.ModuleList) -> list[str]:
    return [f"{prefix}.{i}" if prefix else str(i) for i in range(len(blocks))]


def inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def view(model: nn.Module, names: list[str]) -> nn.Module:
    """A module tree holding ``model``'s submodules ``names`` at the same dotted paths (the
    containers on the way are empty placeholders, in the model's train/eval mode, so code that
    restores a view's mode leaves the model's as it was)."""
    root = nn.Module()
    root.training = model.training
    for name in names:
        node = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(node, p) or not isinstance(getattr(node, p), nn.Module):
                node.add_module(p, nn.Module())
                getattr(node, p).training = model.training
            node = getattr(node, p)
        node.add_module(parts[-1], model.get_submodule(name))
    return root


def hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden state a block is called with: its first positional argument or ``hidden_states``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ConfigError("the first block was called without a positional hidden state or hidden_states=; "
                      "this architecture's blocks cannot be streamed")


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword arguments with any key/value cache dropped: calling a block again on the
    same batch must not append to (or read) a cache the first call filled."""
    out = {}
    for k, v in kwargs.items():
        if "cache" in type(v).__name__.lower() or k in ("past_key_value", "past_key_values", "layer_past"):
            v = None
        elif k == "use_cache":
            v = False
        out[k] = v
    return out


def first_tensor(out: Any) -> torch.Tensor:
    """A block's output hidden state (blocks return it bare or first in a tuple)."""
    return out if isinstance(out, torch.Tensor) else out[0]


@dataclass
class BlockCall:
    """What the first block was called with, for one batch: the arguments besides the hidden
    state are the same for every block (masks, position embeddings) and kept as they were."""

    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None
    tuple_out: bool = False

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.args:
            out = block(hidden, *self.args[1:], **self.kwargs)
        else:
            out = block(**{**self.kwargs, "hidden_states": hidden})
        self.tuple_out = not isinstance(out, torch.Tensor)
        return first_tensor(out)


@dataclass
class UnitBatch(Batch):
    """A batch that runs one unit: ``runner(model)`` is called instead of the model (the token
    mask still drops padding rows from the statistics)."""

    runner: Callable[[nn.Module], Any] = field(default=None, repr=False)  # type: ignore[assignment]

    def to(self, device: str | torch.device) -> "UnitBatch":
        return self

    def run(self, model: nn.Module) -> Any:
        return self.runner(model)


class StandIn(nn.Module):
    """Takes a block's place in its module list; reads of block attributes the model makes
    (``attention_type``...) go to the block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class Catcher(StandIn):
    """Stands in for the first block: records the call and stops the forward pass."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.calls: list[tuple[tuple, dict[str, Any]]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        raise StopForward


class Replay(StandIn):
    """Stands in for a block after the last one is done: returns the stored final hidden state
    (in the form the blocks return it), whatever it is fed."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, tuple_out: bool) -> None:
        super().__init__(block)
        self.hidden, self.tuple_out = hidden, tuple_out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.tuple_out else self.hidden


def run_until_blocks(model: nn.Module, blocks: nn.ModuleList, batch: Batch) -> tuple[tuple, dict[str, Any]]:
    """Run ``batch`` through ``model`` up to the first block and return that block's call."""
    catcher = Catcher(blocks[0])
    blocks[0] = catcher
    try:
        try:
            batch.run(model)
        except StopForward:
            pass
    finally:
        blocks[0] = catcher.block
    if not catcher.calls:
        raise ConfigError("the forward pass never reached the first block; name the block list with --blocks")
    return catcher.calls[0]


def run_after_blocks(model: nn.Module, blocks: nn.ModuleList, batch: Batch, hidden: torch.Tensor,
                     tuple_out: bool) -> Any:
    """Run ``batch`` through ``model`` with every block replaced by the stored final ``hidden``."""
    saved = list(blocks)
    for i, b in enumerate(saved):
        blocks[i] = Replay(b, hidden, tuple_out)
    try:
        return batch.run(model)
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
