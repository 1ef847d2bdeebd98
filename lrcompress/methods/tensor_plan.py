"""Tensor methods in the planner: Tucker-2 / CP for kxk Conv2d, tensor-train for Linear.

These layers have no single spectrum, so a ``ratio`` budget gives each of them its uniform
share (the largest ranks whose parameters fit ``ratio`` x dense), ``rank`` sets the rank (a
(r_out, r_in) pair for Tucker, the CP rank, the largest TT bond), and ``energy`` is supported
for Tucker only (per mode, from the mode spectra, whitened on the input mode when calibrated).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import AutoConfig, CompressConfig, CPConfig, TTConfig, TuckerConfig, method_config
from ..errors import ConfigError
from ..decompose import Metric, spectrum
from ..planning.targets import is_kxk_conv


def tensor_method(mod: nn.Module, config: CompressConfig) -> str | None:
    """The tensor method that applies to ``mod`` under ``config`` (None: matrix methods)."""
    if isinstance(config.method, (TuckerConfig, CPConfig)) and is_kxk_conv(mod):
        return config.method.name
    if isinstance(config.method, TTConfig) and isinstance(mod, nn.Linear):
        return "tt"
    return None


def sub_config(config: CompressConfig, method: str) -> Any:
    """The method config a layer uses: the configured one, or defaults under --method auto."""
    return method_config(method) if isinstance(config.method, AutoConfig) else config.method


def auto_choice(mod: nn.Module, config: CompressConfig, frac: float, gram: torch.Tensor | None,
                whitened_error: float | None) -> tuple[str | None, str]:
    """--method auto: (tensor method or None for whitened SVD, why). Candidates are compared
    by their output error on the calibration metric at the same parameter budget."""
    dense = mod.weight.numel()
    if is_kxk_conv(mod):
        errs: dict[str, float] = {}
        for method in ("tucker", "cp"):
            if unsupported(mod, method) is not None:
                continue
            errs[method] = _predicted(mod, method, frac * dense, gram)
        if not errs:
            return None, "auto: " + (unsupported(mod, "tucker") or "no tensor method applies")
        best = min(errs, key=lambda k: errs[k])
        return best, "auto: " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()) + f" -> {best}"
    if isinstance(mod, nn.Linear) and getattr(config.method, "try_tt", False) and whitened_error is not None:
        if unsupported(mod, "tt") is not None:
            return None, "auto: svd-whiten (features do not factor into TT modes)"
        tt_err = _predicted(mod, "tt", frac * dense, gram)
        if tt_err < whitened_error:
            return "tt", f"auto: tt {tt_err:.4f} < svd-whiten {whitened_error:.4f}"
        return None, f"auto: svd-whiten {whitened_error:.4f} <= tt {tt_err:.4f}"
    return None, ""


def _predicted(mod: nn.Module, method: str, budget: float, gram: torch.Tensor | None) -> float:
    """Relative output error (channel/whitened metric when calibrated) of ``method`` within
    ``budget`` parameters; inf when nothing fits or the fit is unusable."""
    if method == "tucker":
        from ..decompose.tucker import tucker2
        s_out, s_in = tucker_mode_spectra(mod.weight, gram)
        ranks = _tucker_ranks_for_budget(s_out, s_in, tuple(mod.weight.shape), budget)
        return math.inf if ranks is None else tucker2(mod.weight, ranks, in_gram=gram).relative_error
    if method == "cp":
        from ..decompose.cp import cp_conv
        out_c, in_c, kh, kw = mod.weight.shape
        r = math.floor(budget / (in_c + out_c + kh + kw))
        if r < 1:
            return math.inf
        f = cp_conv(mod.weight, r, in_gram=gram)
        return f.relative_error if f.usable else math.inf
    from ..decompose.tt import tt_matrix, tt_max_rank_for_params
    modes = tt_layer_modes(mod, TTConfig())
    if isinstance(modes, str):
        return math.inf
    out_m, in_m, _ = modes
    r = tt_max_rank_for_params(out_m, in_m, int(budget))
    if r < 1:
        return math.inf
    f = tt_matrix(mod.weight.detach(), out_m, in_m, max_rank=r, in_gram=gram)
    return f.output_error if f.output_error is not None else f.relative_error


def unsupported(mod: nn.Module, method: str, config: CompressConfig | None = None) -> str | None:
    """A one-line reason when ``mod`` cannot take ``method`` (kept dense), else None. For tt the
    modes come from ``config`` (default: ``TTConfig()``)."""
    if method in ("tucker", "cp"):
        from .conv_layers import conv_unsupported
        return conv_unsupported(mod, method)
    if method == "tt":
        tt_config = sub_config(config, "tt") if config is not None else TTConfig()
        modes = tt_layer_modes(mod, tt_config)
        return modes if isinstance(modes, str) else None
    return None


def check_tensor_budget(config: CompressConfig) -> None:
    """Refuse budgets a tensor method has no meaning for, before any layer is looked at."""
    if config.energy is not None and isinstance(config.method, CPConfig):
        raise ConfigError("--energy has no meaning for CP (no nested spectrum); use --rank or --ratio")
    if config.energy is not None and isinstance(config.method, TTConfig):
        raise ConfigError("--energy is not supported for --method tt; use --rank (largest TT bond) or --ratio")


def check_tt_shape_used(config: CompressConfig, refused: list[tuple[str, nn.Module]]) -> None:
    """Refuse a ``--tt-shape`` that fits none of the Linear layers tt would take (``refused``:
    the layers it did not fit, when none was planned)."""
    shape = getattr(config.method, "tt_shape", None)
    if shape is None or not refused:
        return
    name, mod = refused[0]
    raise ConfigError(f"--tt-shape {_shape_text(shape)} fits no targeted Linear layer (products "
                      f"{math.prod(shape[0])}:{math.prod(shape[1])}; {name!r} is {mod.out_features}x{mod.in_features}, "
                      "out x in); give modes whose products match a layer, or --targets only layers of that shape")


def _shape_text(shape: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    return ":".join("x".join(map(str, part)) for part in shape)


def tt_layer_modes(mod: nn.Module, config: TTConfig, *, fallback: bool = True
                   ) -> tuple[tuple[int, ...], tuple[int, ...], str] | str:
    """(out modes, in modes, note) of Linear ``mod``, or a one-line reason (str) why no
    tensor-train fits it. Modes: ``config.tt_shape`` when set, else ``config.modes`` balanced
    modes per feature count, else (``fallback``) the most modes >= 2 below that which split both
    counts (``note`` says so)."""
    from ..decompose.tt import balanced_split
    if not isinstance(mod, nn.Linear):
        return f"{type(mod).__name__} is not an nn.Linear: tensor-train takes Linear layers only"
    out_f, in_f = mod.out_features, mod.in_features
    if config.tt_shape is not None:
        out_m, in_m = config.tt_shape
        if math.prod(out_m) != out_f or math.prod(in_m) != in_f:
            return (f"--tt-shape {_shape_text(config.tt_shape)} has products {math.prod(out_m)}:{math.prod(in_m)} "
                    f"but the layer is {out_f}x{in_f} (out x in)")
        return tuple(out_m), tuple(in_m), ""
    counts = list(range(config.modes, 1 if fallback else config.modes - 1, -1))
    for d in counts:
        out_m, in_m = balanced_split(out_f, d), balanced_split(in_f, d)
        if out_m is not None and in_m is not None:
            note = "" if d == config.modes else (f"{d} TT modes: {out_f}x{in_f} (out x in) does not split into "
                                                 f"{config.modes} balanced modes")
            return out_m, tuple(sorted(in_m, reverse=True)), note

    whys = [_factors_text(n) for n in dict.fromkeys((out_f, in_f))
            if all(balanced_split(n, d) is None for d in counts)]
    span = f"2 to {config.modes}" if len(counts) > 1 else f"{config.modes}"
    return (f"{out_f}x{in_f} (out x in) has no tensor-train split into {span} balanced integer modes per side "
            f"({', '.join(whys) or 'no common number of modes'})")


def _factors_text(n: int) -> str:
    """Why ``n`` splits into no modes: '13 is prime', '22 = 2 x 11', '1 is too small'."""
    if n < 2:
        return f"{n} is too small"
    factors, k, rest = [], 2, n
    while k * k <= rest:
        while rest % k == 0:
            factors.append(k)
            rest //= k
        k += 1
    factors += [rest] if rest > 1 else []
    return f"{n} is prime" if factors == [n] else f"{n} = {' x '.join(map(str, factors))}"


def _add_reason(lp: Any, text: str) -> None:
    """Append ``text`` to a layer plan's reason ('; '-separated)."""
    lp.reason = "; ".join(x for x in (lp.reason, text) if x)


def explicit_refusal(mod: nn.Module, method: str, config: CompressConfig) -> str | None:
    """Why a layer named exactly in --targets cannot take ``method`` (None: it can). Such a
    layer gets the configured TT modes only; the reason then names a --tt-shape that fits."""
    reason = unsupported(mod, method, config)
    if method != "tt" or reason is not None:
        return reason
    tt_config = sub_config(config, "tt")
    strict = tt_layer_modes(mod, tt_config, fallback=False)
    if not isinstance(strict, str):
        return None
    fewer = tt_layer_modes(mod, tt_config)
    if isinstance(fewer, str):  # no split with fewer modes either (unsupported() would have said so)
        return strict
    return (f"{strict}; --tt-shape {_shape_text((fewer[0], fewer[1]))} ({len(fewer[0])} modes) would fit it")


def _mode_spectrum(mat: torch.Tensor, gram: torch.Tensor | None) -> Any:
    return spectrum(mat, Metric(gram=gram) if gram is not None else Metric())


def tucker_mode_spectra(weight: torch.Tensor, gram: torch.Tensor | None) -> tuple[Any, Any]:
    """Spectra of the output-mode unfolding and of the (whitened when calibrated) input-mode one."""
    w = weight.detach().double()
    out_c, in_c = w.shape[:2]
    s_out = _mode_spectrum(w.reshape(out_c, -1), None)
    s_in = _mode_spectrum(w.permute(0, 2, 3, 1).reshape(-1, in_c), gram)
    return s_out, s_in


def _tucker_ranks_for_budget(s_out: Any, s_in: Any, shape: tuple[int, int, int, int],
                             budget: float) -> tuple[int, int] | None:
    """The (r_out, r_in) within ``budget`` params that minimises the sum of the two modes'
    normalized truncation losses (the HOSVD error bound); None if nothing fits."""
    from ..decompose.tucker import tucker_params
    out_c, in_c, kh, kw = shape

    def loss(spec: Any, r: int) -> float:
        return spec.tail(r) / spec.total if spec.total > 0 else 0.0

    best: tuple[float, int, int] | None = None
    for r_out in range(1, out_c + 1):
        lo, hi = 0, in_c  # largest r_in that fits with this r_out
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tucker_params(out_c, in_c, kh, kw, r_out, mid, bias=False) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            break
        cand = (loss(s_out, r_out) + loss(s_in, lo), r_out, lo)
        if best is None or cand[0] < best[0] - 1e-15:
            best = cand
    return None if best is None else (best[1], best[2])


def plan_layer(lp: Any, mod: nn.Module, method: str, config: CompressConfig, frac: float | None,
               gram: torch.Tensor | None, preset: Any = False) -> None:
    """Fill ``lp`` (a LayerPlan) for a tensor method: ranks, params after, or why dense.
    ``preset``: Tucker ranks chosen by the global allocator (None = keep dense)."""
    lp.method = method
    reason = unsupported(mod, method, config)
    if reason is not None:
        lp.reason = reason
        return
    dense = lp.params_before
    if method == "tucker":
        from ..decompose.tucker import tucker_params
        out_c, in_c, kh, kw = mod.weight.shape
        if isinstance(config.rank, tuple):
            r_out, r_in = config.rank
            if r_out > out_c or r_in > in_c:
                raise ConfigError(f"--rank {r_out},{r_in} exceeds the channels of conv {lp.name!r} (out {out_c}, "
                                  f"in {in_c}); use R_OUT <= {out_c} and R_IN <= {in_c}")
            ranks = (r_out, r_in)
        elif config.rank is not None:
            r = config.rank
            if r > max(out_c, in_c):
                raise ConfigError(f"--rank {r} exceeds both channel counts of conv {lp.name!r} (out {out_c}, in "
                                  f"{in_c}); use --rank <= {max(out_c, in_c)} (each mode is capped at its channels)")
            ranks = (min(r, out_c), min(r, in_c))
        else:
            s_out, s_in = tucker_mode_spectra(mod.weight, gram)
            if config.energy is not None:
                ranks = (min(s_out.rank_for_energy(config.energy), out_c),
                         min(s_in.rank_for_energy(config.energy), in_c))
            else:
                ranks = preset if preset is not False else _tucker_ranks_for_budget(
                    s_out, s_in, (out_c, in_c, kh, kw), frac * dense)
                if preset is None:
                    lp.reason = "global Tucker allocation keeps this layer dense (cheapest loss per parameter)"
                    return
                if ranks is None:
                    lp.reason = f"Tucker rank (1, 1) already needs more than {frac:.0%} of the layer: kept dense"
                    return
        after = tucker_params(out_c, in_c, kh, kw, ranks[0], ranks[1], bias=False)
        lp.ranks, rank = list(ranks), max(ranks)
    elif method == "cp":
        from ..decompose.cp import cp_params
        out_c, in_c, kh, kw = mod.weight.shape
        rank = config.rank if config.rank is not None else max(1, math.floor(frac * dense / (in_c + out_c + kh + kw)))
        after = cp_params(out_c, in_c, kh, kw, rank, bias=False)
        lp.ranks = [rank]
    else:
        from ..decompose.tt import tt_full_ranks, tt_max_rank_for_params, tt_params
        modes = tt_layer_modes(mod, sub_config(config, "tt"))
        if isinstance(modes, str):  # (unsupported() above already said so)
            _add_reason(lp, modes)
            return
        out_m, in_m, note = modes
        _add_reason(lp, note)
        rank = config.rank if config.rank is not None else tt_max_rank_for_params(out_m, in_m, int(frac * dense))
        if rank < 1:
            _add_reason(lp, f"TT rank 1 already needs more than {frac:.0%} of the layer: kept dense")
            return
        from ..decompose.tt import tt_flops
        full = tt_full_ranks(out_m, in_m)
        ranks = tuple(min(rank, f) for f in full)
        after = tt_params(out_m, in_m, ranks) + (mod.in_features if gram is not None else 0)
        lp.ranks = [list(out_m), list(in_m), list(ranks)]
        flops = tt_flops(out_m, in_m, ranks)
        if flops > dense:  # dense MACs per input row = out * in = its parameter count
            _add_reason(lp, f"TT bond {rank} costs {flops / dense:.1f}x the dense multiply-adds per input: kept "
                            "dense (lower --ratio/--rank, or use svd-whiten)")
            return
    if after >= dense:
        lp.reason = f"{method} at this rank needs {after} >= {dense} params (break-even): kept dense"
        return
    lp.rank, lp.params_after = rank, after


def factorize_layer(mod: nn.Module, lp: Any, config: CompressConfig,
                    gram: torch.Tensor | None) -> tuple[nn.Module | None, str]:
    """The factorized module for a planned tensor-method layer, or (None, reason) to keep it
    dense (CP that did not reach a usable fit)."""
    m = sub_config(config, lp.method)
    if lp.method == "tucker":
        from ..decompose.tucker import tucker_module
        new, _ = tucker_module(mod, tuple(lp.ranks), in_gram=gram, max_iter=m.max_iter)
        return new, ""
    if lp.method == "cp":
        from ..decompose.cp import cp_module
        new, f = cp_module(mod, lp.ranks[0], max_iter=m.max_iter, tol=m.tol, seed=config.seed, in_gram=gram,
                           min_fit=m.min_fit)
        if not f.usable:
            return None, f"CP rank {lp.ranks[0]} not usable ({f.reason}): kept dense"
        return new, f"CP fit {f.fit:.3f}" + ("" if f.converged else f" (stopped after {f.iterations} sweeps)")
    from ..decompose.tt import tt_matrix
    from .tt_layers import TTLinear
    out_m, in_m, ranks = lp.ranks
    f = tt_matrix(mod.weight.detach(), out_m, in_m, ranks, in_gram=gram, scale_inputs=gram is not None)
    return TTLinear.from_factors(f, None if mod.bias is None else mod.bias.detach()), ""


def _hull(options: list[tuple[int, float, tuple[int, int] | None]]) -> list[tuple[int, float, tuple[int, int] | None]]:
    """Lower convex hull of (params, loss) options, cheapest first."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    front: list[tuple[int, float, tuple[int, int] | None]] = []
    for p in pts:
        if front and p[1] >= front[-1][1]:
            continue  # dominated
        while len(front) >= 2:
            (x1, y1, _), (x2, y2, _) = front[-2], front[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # front[-1] above the chord
                front.pop()
            else:
                break
        front.append(p)
    return front


def allocate_tucker(layers: list[tuple[Any, nn.Module]], grams: dict[str, torch.Tensor],
                    budget: float) -> dict[str, tuple[int, int] | None]:
    """Global Tucker ranks: spend ``budget`` params where the normalized mode-truncation loss
    drops fastest per parameter (None = keep dense). A tiny layer (e.g. 1 input channel)
    stays dense instead of being squeezed to a useless rank."""
    from ..decompose.tucker import tucker_params
    hulls: dict[str, list] = {}
    for lp, mod in layers:
        out_c, in_c, kh, kw = mod.weight.shape
        s_out, s_in = tucker_mode_spectra(mod.weight, grams.get(lp.name))
        lo = [s_out.tail(r) / s_out.total if s_out.total > 0 else 0.0 for r in range(out_c + 1)]
        li = [s_in.tail(r) / s_in.total if s_in.total > 0 else 0.0 for r in range(in_c + 1)]
        opts: list = [(lp.params_before, 0.0, None)]
        for ro in range(1, out_c + 1):
            for ri in range(1, in_c + 1):
                n = tucker_params(out_c, in_c, kh, kw, ro, ri, bias=False)
                if n < lp.params_before:
                    opts.append((n, lo[ro] + li[ri], (ro, ri)))
        hulls[lp.name] = _hull(opts)
    spent = sum(h[0][0] for h in hulls.values())
    if spent > budget:
        raise ConfigError(f"the budget ({int(budget)} params) cannot hold even rank (1, 1) for every Tucker "
                          f"layer ({spent} params); raise --ratio or narrow --targets")
    return hull_greedy(hulls, budget)


def hull_greedy(hulls: dict[str, list], budget: float, tol: float = 0.0) -> dict[str, Any]:
    """Start every layer at the cheapest point of its lower convex hull of (cost, loss, choice)
    and take, while one fits ``budget`` (+ ``tol``), the step with the largest loss decrease per
    unit of cost. Returns name -> choice."""
    pos = dict.fromkeys(hulls, 0)
    spent = sum(h[0][0] for h in hulls.values())
    while True:
        best, best_gain = None, 0.0
        for name, h in hulls.items():
            i = pos[name]
            if i + 1 < len(h):
                dc = h[i + 1][0] - h[i][0]  # hull costs strictly increase
                gain = (h[i][1] - h[i + 1][1]) / dc
                if spent + dc <= budget + tol and gain > best_gain:
                    best, best_gain = name, gain
        if best is None:
            break
        spent += hulls[best][pos[best] + 1][0] - hulls[best][pos[best]][0]
        pos[best] += 1
    return {name: h[pos[name]][2] for name, h in hulls.items()}
