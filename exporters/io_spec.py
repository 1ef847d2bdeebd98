"""Model I/O description shared by the exporters: named example inputs, dynamic axes, named outputs.

A model is wrapped so that its forward takes tensors positionally in a fixed order and returns a flat
tuple of tensors; the names of those tensors come from the model's output structure (HF ModelOutput
keys, dict keys, or ``output`` for a plain tensor).
"""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BadInput

ExampleInputs = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
SINGLE_INPUT = "input"
BATCH = "batch"
SEQUENCE = "sequence"


@dataclass
class IOSpec:
    """Named inputs (in call order), how to call the model, and the dynamic axes of each input."""

    inputs: OrderedDict[str, torch.Tensor]
    positional: bool
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)
    output_dtypes: list[torch.dtype] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[OrderedDict[str, torch.Tensor], bool]:
    """Turn a tensor / tuple / mapping of example inputs into ``(named inputs, call positionally?)``.

    A single tensor becomes ``{"input": t}`` and is passed positionally; a mapping is passed as keyword
    arguments unless its only key is ``"input"``; a tuple/list becomes ``input_0, input_1, ...`` passed positionally.
    """
    if isinstance(example_inputs, torch.Tensor):
        return OrderedDict([(SINGLE_INPUT, example_inputs)]), True
    if isinstance(example_inputs, Mapping):
        named = OrderedDict(example_inputs.items())
        positional = list(named) == [SINGLE_INPUT]
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        named = OrderedDict((f"input_{i}", t) for i, t in enumerate(example_inputs))
        positional = True
    else:
        raise BadInput(
            f"example_inputs of type {type(example_inputs).__name__} is not supported; "
            "pass a torch.Tensor or a dict name -> torch.Tensor"
        )
    if not named:
        raise BadInput("example_inputs is empty; pass at least one tensor")
    for name, value in named.items():
        if not isinstance(name, str) or not name:
            raise BadInput(f"example input name {name!r} is not a non-empty string; use names like 'input_ids'")
        if not isinstance(value, torch.Tensor):
            raise BadInput(f"example input '{name}' is a {type(value).__name__}, not a torch.Tensor; convert it with torch.as_tensor")
    return named, positional


def default_dynamic_axes(inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch axis for every input; sequence axis too for integer/bool inputs of rank >= 2 (token ids, masks)."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in inputs.items():
        if t.dim() == 0:
            continue
        spec = {0: BATCH}
        if t.dim() >= 2 and not t.is_floating_point() and not t.is_complex():
            spec[1] = SEQUENCE
        axes[name] = spec
    return axes


def resolve_dynamic_axes(
    inputs: Mapping[str, torch.Tensor],
    dynamic: bool | Mapping[str, Mapping[int, str]] = True,
) -> dict[str, dict[int, str]]:
    """``True`` -> defaults, ``False`` -> none, a mapping -> validated user axes."""
    if dynamic is True:
        return default_dynamic_axes(inputs)
    if dynamic is False or dynamic is None:
        return {}
    axes: dict[str, dict[int, str]] = {}
    for name, spec in dynamic.items():
        if name not in inputs:
            raise BadInput(f"dynamic axes name input '{name}', which is not an example input; valid: {', '.join(inputs)}")
        rank = inputs[name].dim()
        for axis in spec:
            if not 0 <= int(axis) < rank:
                raise BadInput(f"dynamic axis {axis} of input '{name}' is outside its rank {rank}; use 0..{rank - 1}")
        axes[name] = {int(a): str(label) for a, label in spec.items()}
    return axes


def widen_examples(
    inputs: OrderedDict[str, torch.Tensor], axes: Mapping[str, Mapping[int, str]]
) -> OrderedDict[str, torch.Tensor]:
    """Repeat size-1 dynamic axes to size 2: torch.export specialises axes of size 0/1 to constants."""
    sizes: dict[str, int] = {}
    for name, spec in axes.items():
        for axis, label in spec.items():
            size = inputs[name].shape[axis]
            if label in sizes and sizes[label] != size:
                raise BadInput(
                    f"dynamic axis '{label}' has size {sizes[label]} in one input and {size} in input '{name}'; "
                    "example inputs sharing an axis name must agree"
                )
            sizes[label] = size
    out = OrderedDict()
    for name, t in inputs.items():
        for axis, label in axes.get(name, {}).items():
            if t.shape[axis] == 1:
                reps = [1] * t.dim()
                reps[axis] = 2
                t = t.repeat(*reps)
        out[name] = t
    return out


def flatten_outputs(out: Any, prefix: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """Flatten a model output into ``(name, tensor)`` pairs; ``None`` and non-tensor leaves are dropped."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):  # dict and transformers ModelOutput (an OrderedDict without None values)
        pairs: list[tuple[str, torch.Tensor]] = []
        for key, value in out.items():
            if value is not None:
                pairs.extend(flatten_outputs(value, f"{prefix}.{key}" if prefix else str(key)))
        return pairs
    if isinstance(out, (tuple, list)):
        base = prefix or "output"
        pairs = []
        for i, value in enumerate(out):
            if value is not None:
                pairs.extend(flatten_outputs(value, f"{base}_{i}"))
        return pairs
    return []


def _accepts_return_dict(model: nn.Module) -> bool:
    try:
        return "return_dict" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_options(model: nn.Module) -> dict[str, Any]:
    """Keyword options every call of ``model`` gets: ``use_cache=False`` when its forward takes ``use_cache`` (a
    Hugging Face decoder), so that it returns no KV cache and a causal LM maps ``input_ids`` (+ mask) to logits
    only; nothing for any other module."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


class NamedIOModule(nn.Module):
    """Wrap ``model`` so forward takes tensors positionally in ``names`` order and returns a flat tuple
    (a Hugging Face decoder is called with ``use_cache=False``: logits, no KV cache)."""

    def __init__(self, model: nn.Module, names: Sequence[str], positional: bool) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.positional = positional
        self.return_dict = not positional and _accepts_return_dict(model)
        self.options = call_options(model)

    def call(self, *args: torch.Tensor) -> Any:
        """The model's own output for ``args`` (in ``names`` order)."""
        if self.positional:
            return self.model(*args, **self.options)
        kwargs: dict[str, Any] = dict(zip(self.names, args))
        if self.return_dict:
            kwargs["return_dict"] = True
        return self.model(**kwargs, **self.options)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flatten_outputs(self.call(*args)))


def unique_names(names: Sequence[str]) -> list[str]:
    """Make output names unique by suffixing repeats with ``_1``, ``_2``..."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        result.append(name)
    return result


def prepare(
    model: nn.Module,
    example_inputs: ExampleInputs,
    dynamic: bool | Mapping[str, Mapping[int, str]] = True,
    widen: bool = True,
) -> tuple[NamedIOModule, IOSpec]:
    """Wrap ``model``, resolve dynamic axes and discover output names by running it once (no grad)."""
    if not isinstance(model, nn.Module):
        raise BadInput(f"model is a {type(model).__name__}, not a torch.nn.Module; pass the module itself")
    inputs, positional = normalize_inputs(example_inputs)
    axes = resolve_dynamic_axes(inputs, dynamic)
    if widen:
        inputs = widen_examples(inputs, axes)
    wrapper = NamedIOModule(model, list(inputs), positional).eval()
    with torch.no_grad():
        try:
            out = wrapper.call(*inputs.values())
        except Exception as exc:
            from .errors import first_line

            raise BadInput(
                f"the model failed on the example inputs ({', '.join(f'{k}{tuple(v.shape)}' for k, v in inputs.items())}): "
                f"{first_line(exc)}; pass inputs the model accepts"
            ) from exc
    pairs = flatten_outputs(out)
    if not pairs:
        raise BadInput(f"the model returned {type(out).__name__} with no tensors; it must return tensors to be exported")
    spec = IOSpec(
        inputs=inputs,
        positional=positional,
        dynamic_axes=axes,
        output_names=unique_names([n for n, _ in pairs]),
        output_dtypes=[t.dtype for _, t in pairs],
    )
    return wrapper, spec


class eval_mode:
    """Context manager: put every submodule in eval mode, restore each one's mode on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training


def locate_op(ep: Any, op: str, node_name: str | None = None) -> str | None:
    """'module.path (Type)' of the graph node calling ``op``, from torch.export's nn_module_stack."""
    if ep is None:
        return None
    candidates = [n for n in ep.graph.nodes if n.op == "call_function"]
    hits = [n for n in candidates if node_name and n.name == node_name]
    hits += [n for n in candidates if str(n.target).replace("::", ".").startswith(op.replace("::", "."))]
    for node in hits:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path, kind = list(stack.values())[-1]
        path = re.sub(r"^(L\['self'\]\.)?model\.?", "", str(path)) or "<root>"
        kind_name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
        return f"'{path}' ({kind_name})"
    return None


def second_example(inputs: Mapping[str, torch.Tensor], seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Another valid example of the same shapes, derived deterministically from ``inputs``.

    Float inputs get seeded noise of their own scale; integer inputs (token ids) get other values within
    their [min, max], except 0/1 tensors holding both values (attention masks), which become all ones;
    bool and constant tensors are kept.
    """
    gen = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, t in inputs.items():
        if t.numel() == 0 or t.dtype == torch.bool or t.is_complex():
            out[name] = t
        elif t.is_floating_point():
            base = t.detach().to("cpu", torch.float32)
            finite = base[torch.isfinite(base)]
            scale = float(finite.std()) if finite.numel() > 1 else 0.0
            scale = scale or (float(finite.abs().mean()) if finite.numel() else 0.0) or 1.0
            noise = torch.randn(base.shape, generator=gen) * scale
            out[name] = (base + noise).to(t.dtype).to(t.device)
        else:
            lo, hi = int(t.min()), int(t.max())
            if lo == 0 and hi == 1:
                out[name] = torch.ones_like(t)
            elif lo == hi:
                out[name] = t
            else:
                out[name] = torch.randint(lo, hi + 1, tuple(t.shape), generator=gen, dtype=t.dtype).to(t.device)
    return out


def resized_example(
    inputs: Mapping[str, torch.Tensor], axes: Mapping[str, Mapping[int, str]],
    fixed: Mapping[str, Mapping[int, int]] | None = None, seed: int = 1,
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, int]]:
    """A valid example of other sizes along the dynamic axes, and those sizes by axis name.

    The values come from :func:`second_example`; the batch axis grows by one, every other dynamic axis (the
    sequence) shrinks by one (grows from 2, the smallest exported size), so that a model with a position limit
    is not pushed past it. Axes the graph fixed (``fixed``: input -> axis -> size) keep their size, and so does
    every axis sharing a name with one of them.
    """
    base = second_example(inputs, seed)
    frozen = {label for name, spec in axes.items() for axis, label in spec.items() if axis in (fixed or {}).get(name, {})}
    sizes: dict[str, int] = {}
    for name, spec in axes.items():
        for axis, label in spec.items():
            if label not in frozen and label not in sizes:
                n = int(inputs[name].shape[axis])
                sizes[label] = n + 1 if label == BATCH or n <= 2 else n - 1
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, t in base.items():
        for axis, label in axes.get(name, {}).items():
            if label in sizes and t.shape[axis] != sizes[label]:
                t = t.index_select(axis, torch.arange(sizes[label], device=t.device) % t.shape[axis])
        out[name] = t
    return out, sizes
