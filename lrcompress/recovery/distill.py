"""Distillation losses and agreement metrics between a student's and a teacher's outputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RecoveryConfig
from ..errors import ConfigError, DataError
from ..methods.layers import LowRankEmbedding
from .lora import MATRIX_LAYERS, factor_params


def main_output(result: Any) -> torch.Tensor:
    """The tensor to distil: a plain tensor, ``last_hidden_state``, ``logits``, or the first."""
    if isinstance(result, torch.Tensor):
        return result
    for key in ("last_hidden_state", "logits"):
        v = result.get(key) if isinstance(result, dict) else getattr(result, key, None)
        if isinstance(v, torch.Tensor):
            return v
    seq = list(result.values()) if isinstance(result, dict) else list(result)
    for v in seq:
        if isinstance(v, torch.Tensor):
            return v
    raise DataError(f"the model returned {type(result).__name__} without a tensor; recovery needs a tensor output")


def _token_mask(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask if mask is not None and out.dim() == 3 and tuple(out.shape[:2]) == tuple(mask.shape) else None


def loss_terms(config: RecoveryConfig, out: torch.Tensor, mask: torch.Tensor | None) -> tuple[str, ...]:
    if config.loss:
        if "pooled" in config.loss and _token_mask(out, mask) is None:
            raise ConfigError(f"--loss pooled needs token outputs (batch x tokens x features) with a mask; the "
                              f"model returns shape {list(out.shape)}: use --loss hidden")
        return config.loss
    return ("hidden", "pooled") if _token_mask(out, mask) is not None else ("hidden",)


def per_example_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
                     terms: tuple[str, ...]) -> torch.Tensor:
    """Distillation loss per example (B,): mean over real tokens of (1 - cosine) plus the
    squared error normalised by the teacher's energy; pooled cosine; KL of softmax outputs."""
    s, t = s.float(), t.float()
    m = _token_mask(s, mask)
    if s.dim() == 3:
        w = m.to(s.dtype) if m is not None else torch.ones(s.shape[:2], dtype=s.dtype, device=s.device)
    else:
        s, t = s.reshape(s.shape[0], 1, -1), t.reshape(t.shape[0], 1, -1)
        w = torch.ones(s.shape[:2], dtype=s.dtype, device=s.device)
    n = w.sum(1).clamp_min(1)
    total = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    if "hidden" in terms:
        cos = F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        se = ((s - t) ** 2).sum(-1)
        total = total + ((1 - cos) * w).sum(1) / n
        total = total + (se * w).sum(1) / ((t * t).sum(-1) * w).sum(1).clamp_min(1e-12)
    if "pooled" in terms:
        ps, pt = (s * w[..., None]).sum(1) / n[:, None], (t * w[..., None]).sum(1) / n[:, None]
        total = total + 1 - F.cosine_similarity(ps, pt, dim=-1, eps=1e-8)
    if "kl" in terms:
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        total = total + (kl * w).sum(1) / n
    return total


def example_cosine(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example cosine of the pooled (masked mean) token outputs, or of the flat outputs."""
    m = _token_mask(s, mask)
    s, t = s.float(), t.float()
    if m is not None:
        w = m.to(s.dtype)[..., None]
        s, t = (s * w).sum(1) / w.sum(1).clamp_min(1), (t * w).sum(1) / w.sum(1).clamp_min(1)
    return F.cosine_similarity(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), dim=-1, eps=1e-8)


def ortho_penalty(model: nn.Module) -> torch.Tensor:
    """Mean over two-factor layers of the off-diagonal share of A^T A and B B^T: zero when
    the factor columns/rows are mutually orthogonal (an SVD-like basis), gauge-aware."""
    terms = []
    for mod in model.modules():
        if isinstance(mod, MATRIX_LAYERS):
            a, b = factor_params(mod)
            a = a.reshape(a.shape[0], -1)
            b = b.T if isinstance(mod, LowRankEmbedding) else b.reshape(b.shape[0], -1)
            for g in (a.T @ a, b @ b.T):
                off = g - torch.diag(torch.diagonal(g))
                terms.append((off * off).sum() / (g * g).sum().clamp_min(1e-12))
    return torch.stack(terms).mean() if terms else torch.zeros(())
