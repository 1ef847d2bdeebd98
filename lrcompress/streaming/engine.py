"""Block-sequential compression: one unit (the layers before the blocks, each block, the layers
after them) at a time, with the calibration activations pushed through unit by unit.

Two activation streams run side by side: the original model's (the targets) and the
compressed model's (what each layer is actually fed). ``calibration="open"`` plans and
factorizes every unit from the original stream, as the in-memory path does; ``"closed"`` fits
each linear layer to the original outputs from the compressed stream (``closed_loop``). A
global ``ratio`` allocation first streams once to collect every layer's spectrum and block-level
sensitivity, then allocates, then factorizes in a second pass. With a ``LazyCheckpoint`` only one
block's weights are in memory at a time and a ``ShardWriter`` writes each finished block at once.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from ..calibration.calibrate import Calibration, _select, calibrate
from ..config import CompressConfig
from ..decompose import Spectrum
from ..io.data import Batch, TensorData, TextData
from ..methods import registry
from ..methods.apply import LayerResult, apply_plan, set_module
from ..planning.allocation import allocate, budget_fraction
from ..planning.make_plan import make_plan
from ..planning.plan_types import LayerPlan, Plan
from ..planning.targets import layer_matrix, select_targets, tied_weights
from . import memory
from .loop import closed_unit
from .rules import check_streamable, closed_applies, lite_spectrum, override_ranks, subplan  # noqa: F401
from .record import StreamResult, add_untouched, record_unit, restore_units
from .store import ActivationStore
from .units import (BlockCall, UnitBatch, block_names, find_blocks, hidden_of, inside, run_after_blocks, run_until_blocks,
                    view, without_cache)
from .weights import LazyCheckpoint, release
from .writer import ShardWriter


@dataclass
class Streams:
    """The original and the compressed activations at the current unit boundary."""

    original: ActivationStore
    current: ActivationStore

    def save(self) -> dict[str, list[torch.Tensor]]:
        return {"original": self.original.tensors(), "current": self.current.tensors()}


class Engine:
    """One block-sequential run over ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, config: CompressConfig, data: TextData | TensorData, *,
                 lazy: LazyCheckpoint | None = None, writer: ShardWriter | None = None, batch_size: int = 32,
                 max_memory: int | None = None, out_dtype: torch.dtype | None = None,
                 progress: Callable[[str, Any], None] | None = None, stop_after: int | None = None,
                 plan: Plan | None = None) -> None:
        check_streamable(config)
        method = registry.for_config(config.method)
        self.closed = config.calibration == "closed" or (config.calibration == "auto" and method.whitened
                                                         and method.spectral and not method.grouped)
        self.model, self.config, self.lazy, self.writer = model, config, lazy, writer
        self.progress, self.stop_after, self.out_dtype = progress, stop_after, out_dtype
        names = select_targets(model, config.targets, config.exclude, config.method.name)
        self.tied = tied_weights(model, names)  # kept dense, as in memory
        self.names = [n for n in names if n not in self.tied]
        self.prefix, self.blocks = find_blocks(model, config.blocks)
        self.block_paths = block_names(self.prefix, self.blocks)
        self.batches: list[Batch] = list(data.batches(batch_size))
        self.max_memory = max_memory
        self.result = StreamResult([], Plan([], 0, config))
        self.full_plan = plan
        self._generation = 0

    # -- set-up ------------------------------------------------------------------------------
    def _outside_modules(self) -> list[str]:
        """Modules outside the blocks that hold parameters of their own ('' = the model)."""
        return [n for n, m in self.model.named_modules()
                if not inside(n, self.prefix) and any(True for _ in m.parameters(recurse=False))]

    def _start(self) -> None:
        if self.lazy is not None:
            self.lazy.materialize(self.model, self._outside_modules(), recurse=False)
            if hasattr(self.model, "tie_weights"):
                self.model.tie_weights()
        self.params_model = sum(p.numel() for p in self.model.parameters())
        total = sum(layer_matrix(self.model.get_submodule(n)).numel() for n in self.names)
        self.frac = budget_fraction(total, self.config, self.params_model)[1] if self.config.ratio is not None else None
        outside = [n for n in self.names if not inside(n, self.prefix)]
        fired: set[str] = set()
        hooks = [self.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: fired.add(n)) for n in outside]
        self.calls: list[BlockCall] = []
        hidden: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for b in self.batches:
                    args, kwargs = run_until_blocks(self.model, self.blocks, b)
                    hidden.append(hidden_of(args, kwargs).detach())
                    kw = without_cache({k: v for k, v in kwargs.items() if k != "hidden_states"})
                    rest = tuple(None if "cache" in type(a).__name__.lower() else a for a in args[1:])
                    self.calls.append(BlockCall((None, *rest) if args else (), kw, b.mask))
        finally:
            for h in hooks:
                h.remove()
        self.pre = [n for n in outside if n in fired]
        self.post = [n for n in outside if n not in fired]
        self.units = (["pre"] if self.pre else []) + self.block_paths + (["post"] if self.post else [])
        self.result.examples = sum(next(iter(b.inputs.values())).shape[0] for b in self.batches)
        self.result.tokens = sum(int(b.mask.sum()) if b.mask is not None else 0 for b in self.batches)
        self.hidden0 = hidden
        self._check_memory(hidden)

    def _check_memory(self, hidden: list[torch.Tensor]) -> None:
        block = self.blocks[0]
        per = 4
        block_bytes = sum(p.numel() for p in block.parameters()) * per
        if self.lazy is not None:  # only the weights outside the blocks stay resident
            resident = sum(p.numel() * per for n, p in self.model.named_parameters() if not inside(n, self.prefix)
                           and p.device.type != "meta")
        else:
            resident = sum(p.numel() * p.element_size() for p in self.model.parameters())
        dims = [layer_matrix(self.model.get_submodule(n)).shape for n in self.names if inside(n, self.block_paths[0])]
        inputs = sorted({d[1] for d in dims}, reverse=True)
        stats = 8 * sum(n * n for n in inputs) * (3 if self.closed else 1)
        big = max((max(d) for d in dims), default=0)
        work = 8 * 2 * big * big  # the metric's symmetrised copy and its root / eigenvectors, float64
        act = 2 * sum(h.numel() * h.element_size() for h in hidden)
        baseline = max(memory.rss() - (resident if self.lazy is not None else 0), 0)  # resident is counted apart
        est = memory.Estimate(resident, 2 * block_bytes, stats, work, baseline, act)
        self.estimate = est
        self.act_cap = memory.check_budget(est, self.max_memory, act)

    def _streams(self, original: list[torch.Tensor], current: list[torch.Tensor]) -> Streams:
        folder = self.writer.folder / "spill" if self.writer is not None else None
        cap = None if self.max_memory is None else self.act_cap // 2
        s = Streams(ActivationStore(cap, folder, "original"), ActivationStore(cap, folder, "current"))
        for i, (h, c) in enumerate(zip(original, current)):
            s.original.set(i, h)
            s.current.set(i, c)
        return s

    # -- units -------------------------------------------------------------------------------
    def _unit_names(self, unit: str) -> list[str]:
        if unit == "pre":
            return self.pre
        if unit == "post":
            return self.post
        return [n for n in self.names if inside(n, unit)]

    def _unit_view(self, unit: str) -> nn.Module:
        return view(self.model, self._unit_names(unit) if unit in ("pre", "post") else [unit])

    def _runner(self, unit: str, stream: ActivationStore, block: nn.Module | None = None) -> Callable[[int], Any]:
        """Run unit ``unit`` on batch i of ``stream`` (``block``: another copy of the block)."""
        if unit == "pre":
            return lambda i: hidden_of(*run_until_blocks(self.model, self.blocks, self.batches[i]))
        if unit == "post":
            return lambda i: run_after_blocks(self.model, self.blocks, self.batches[i], stream.get(i),
                                              self.calls[i].tuple_out)
        mod = block if block is not None else self.model.get_submodule(unit)
        return lambda i: self.calls[i].call(mod, stream.get(i))

    def _batches(self, run: Callable[[int], Any], stream: ActivationStore | None) -> list[UnitBatch]:
        out = []
        for i, b in enumerate(self.batches):
            inputs = {"input": stream.get(i)} if stream is not None else b.inputs
            out.append(UnitBatch(inputs, self.calls[i].mask, runner=lambda _v, i=i: run(i)))
        return out

    def _unit_config(self, final: bool, names: list[str]) -> CompressConfig:
        """The config a unit is planned with: its own targets (the run's selection, as patterns that
        are not explicit names, so a layer a method cannot take stays dense as in memory), the
        run's target fraction of the budget, and no further allocation when ranks are given."""
        import re
        cfg = replace(self.config, targets=tuple("re:" + re.escape(n) for n in names), exclude=())
        if cfg.ratio is not None:
            cfg = replace(cfg, scope="targets", ratio=min(max(self.frac, 1e-9), 1.0))
        if final and self.global_ranks is not None:
            cfg = replace(cfg, allocate="uniform", probe_passes=0)
        return cfg

    def _calibrate(self, unit: str, stream: ActivationStore) -> tuple[nn.Module, Calibration, list[str]]:
        v = self._unit_view(unit)
        names = self._unit_names(unit)
        batches = self._batches(self._runner(unit, stream), None if unit == "pre" else stream)
        calib = calibrate(v, batches, names)
        calib.probe = batches[:2]
        return v, calib, names

    def _plan_pass(self, streams: Streams) -> dict[str, int | None]:
        """First pass: spectra and block-level sensitivities of every matrix layer, then one
        global allocation of the budget."""
        layers: list[LayerPlan] = []
        spectra: dict[str, Spectrum] = {}
        weights: dict[str, float] = {}
        original = streams.original
        for unit in self.units:
            self._bring(unit)
            names = self._unit_names(unit)
            plan = Plan([], 0, self.config)
            if names:
                v, calib, _ = self._calibrate(unit, original)
                plan = make_plan(v, self._unit_config(False, names), calib)
            for lp in plan.layers:
                if lp.name in plan.spectra:
                    layers.append(lp)
                    spectra[lp.name] = lite_spectrum(plan.spectra[lp.name])
                    if lp.sensitivity is not None:
                        weights[lp.name] = lp.sensitivity
            nxt = self._advance(unit, original, None)
            if nxt is not original:
                original.drop()
            original = nxt
            self._drop(unit)
            self._tick("plan", unit)
        return allocate(layers, spectra, self.config, self.params_model, weights or None)

    def _advance(self, unit: str, stream: ActivationStore, block: nn.Module | None) -> ActivationStore:
        """The stream at the next boundary: the block's outputs, the first block's inputs for
        ``pre`` (from the model as it is now), unchanged for ``post``."""
        if unit == "post":
            return stream
        run = self._runner(unit, stream, block)
        base = stream.name.split(".")[0]
        self._generation += 1
        out = ActivationStore(stream.cap, stream.folder, f"{base}.{self._generation}")
        with torch.no_grad():
            for i in range(len(self.batches)):
                out.set(i, run(i).detach())
        return out

    def _bring(self, unit: str) -> None:
        if self.lazy is not None and unit not in ("pre", "post"):
            self.lazy.materialize(self.model, [unit])

    def _drop(self, unit: str) -> None:
        if self.lazy is not None and unit not in ("pre", "post"):
            release(self.model.get_submodule(unit))

    def _tick(self, stage: str, unit: str) -> None:
        if self.progress is not None:
            self.progress(stage, unit)

    def _compress_unit(self, unit: str, streams: Streams) -> Streams:
        """Plan, factorize and advance one unit; returns the streams at its far boundary."""
        t0 = time.perf_counter()
        memory.reset_peak()
        self._bring(unit)
        closed = self.closed and unit != "pre"
        block = None if unit in ("pre", "post") else self.model.get_submodule(unit)
        original_block = copy.deepcopy(block) if closed and block is not None else None
        v, names = self._unit_view(unit), self._unit_names(unit)
        plan = Plan([], 0, self.config)
        if names and self.full_plan is not None:  # in memory: the whole model's plan, spectra included
            plan = subplan(self.full_plan, set(names))
        elif names:
            v, calib, names = self._calibrate(unit, streams.original)
            plan = make_plan(v, self._unit_config(True, names), calib)
            del calib  # the plan keeps the metrics it needs; the raw Grams go
        if self.global_ranks is not None and self.full_plan is None:
            override_ranks(plan, self.global_ranks)
        next_original = self._advance(unit, streams.original, None)  # before any layer changes
        results: list[LayerResult] = []
        figures: dict[str, dict[str, float]] = {}
        rest = names
        if closed and names:
            if unit == "post":
                def orig_mod(n: str) -> nn.Module:
                    return self.model.get_submodule(n)
                run_o = self._runner("post", streams.original)
            else:
                rel = lambda n: n[len(unit) + 1:]  # noqa: E731
                def orig_mod(n: str) -> nn.Module:
                    return original_block.get_submodule(rel(n))
                run_o = self._runner(unit, streams.original, original_block)
            results, figures, rest = closed_unit(self.model, plan, names, orig_mod, run_o,
                                                 self._runner(unit, streams.current),
                                                 [c.mask for c in self.calls], self.config)
        layers = plan.layers
        plan.layers = [lp for lp in layers if lp.name in rest]
        opened = apply_plan(v, plan)
        plan.layers = layers
        for r in opened:  # the view's placeholders hold pre/post layers: put them in the model
            if r.rank is not None:
                set_module(self.model, r.name, v.get_submodule(r.name))
        results += opened
        order = {n: i for i, n in enumerate(lp.name for lp in layers)}
        results.sort(key=lambda r: order.get(r.name, 0))
        next_current = self._advance(unit, streams.current, None)
        drift = self._drift(next_original, next_current) if unit != "post" else None
        entry = {"unit": unit, "seconds": time.perf_counter() - t0, "peak_rss": memory.peak_rss(),
                 "output_error": drift}
        self.result.layers += results
        self.result.plan.layers += layers
        self.result.loop.update(figures)
        self.result.units.append(entry)
        self._write(unit, names, results, figures, entry, Streams(next_original, next_current))
        for old, new in ((streams.original, next_original), (streams.current, next_current)):
            if new is not old:
                old.drop()
        self._drop(unit)
        self._tick("factorize", unit)
        return Streams(next_original, next_current)

    def _drift(self, original: ActivationStore, current: ActivationStore) -> float:
        num = den = 0.0
        for i, c in enumerate(self.calls):
            a = _select(original.get(i), c.mask, True).double()
            b = _select(current.get(i), c.mask, True).double()
            num += float(((a - b) ** 2).sum())
            den += float((a * a).sum())
        return (num / den) ** 0.5 if den > 0 else 0.0

    def _write(self, unit: str, names: list[str], results: list[LayerResult], figures: dict, entry: dict,
               streams: Streams) -> None:
        modules = [unit] if unit not in ("pre", "post") else names
        record_unit(self.result, self.model, modules, results, figures, entry, self.writer,
                    streams.save() if self.writer is not None else {}, self.out_dtype)
        if self.writer is not None and self.stop_after is not None and len(self.writer.done) >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {self.stop_after} units (test hook)")

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> StreamResult:
        t0 = time.perf_counter()
        self._start()
        self.global_ranks = None
        self.resumed = self.writer.open() if self.writer is not None else False
        done = self.writer.done if self.writer is not None else []
        if self.full_plan is None and self.config.ratio is not None and self.config.allocate == "global":
            saved = self.writer.state.get("ranks") if self.writer is not None else None
            if saved is not None:
                self.global_ranks = saved
            else:
                start = self._streams(self.hidden0, self.hidden0)
                self.global_ranks = self._plan_pass(start)
                if self.writer is not None:
                    self.writer.state["ranks"] = self.global_ranks
                    self.writer.save_state()
        t1 = time.perf_counter()
        if done:
            saved = self.writer.load_boundary()
            streams = self._streams(saved["original"], saved["current"])
            restore_units(self.result, self.writer.state, done)
        else:
            streams = self._streams(self.hidden0, self.hidden0)
        del self.hidden0
        for unit in self.units:
            if unit in done:
                continue
            streams = self._compress_unit(unit, streams)
        t2 = time.perf_counter()
        self.result.seconds = {"plan": t1 - t0, "factorize": t2 - t1, "total": t2 - t0}
        self.result.peak_rss = max((u["peak_rss"] for u in self.result.units), default=memory.peak_rss())
        self.result.plan.params_model = self.params_model
        add_untouched(self.result, self.model, self.full_plan, self.tied, self.config.method.name)
        return self.result
