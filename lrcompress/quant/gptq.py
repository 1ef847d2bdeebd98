"""GPTQ (Frantar et al. 2022) on the block grid of :mod:`lrcompress.quant.grid`.

Minimises ``||(W - Q) X||_F^2`` over codes ``Q`` on the runtime's block grid, given the Gram
matrix ``G = X X^T`` (in x in) of a layer's calibration inputs. Columns are swept in natural
order (no act-order) so blocks stay contiguous, as MatMulNBits needs. When the sweep reaches the
first column of block ``g``, that block's scales / zero points are taken by the round-to-nearest
rule (:func:`block_params`) from the *current*, already error-updated columns of the block (the
reference implementation's groupsize behaviour with ``static_groups=False``; unlike the reference,
the parameters also see the updates made earlier inside the same lazy batch). Each column is then
rounded by :func:`codes_with` and its error is spread over later columns with the upper Cholesky
factor of ``H^-1``.

All arithmetic is float64, except that the rounding itself runs on the float32 value of each
column, as the runtime's quantizer does (so with ``G = I`` the codes are exactly the
round-to-nearest codes) and the error is taken against the float32 dequantized value, so
``Grid.dequantize()`` is exactly the weight the propagation assumed."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, WeightError
from .grid import Grid, block_params, check_block, codes_with

_LAZY = 128  # columns per lazy batch update (rounded to whole blocks)


def _check(w: torch.Tensor, gram: torch.Tensor, damp: float, what: str, bits: int, block: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ConfigError(f"{what} has shape {shape}; block quantization takes 2-D weights")
    check_block(block, w.shape[1], what, bits)
    cols = w.shape[1]
    if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (cols, cols):
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ConfigError(f"the Gram matrix for {what} has shape {shape}; GPTQ needs ({cols}, {cols}) = "
                          f"X X^T of the layer's {cols} inputs: pass the Gram of that layer's inputs")
    if not (gram.is_floating_point() and bool(torch.isfinite(gram).all())):
        bad = "a non-float dtype " + str(gram.dtype) if not gram.is_floating_point() else "NaN/Inf entries"
        raise ConfigError(f"the Gram matrix for {what} has {bad}; GPTQ needs a finite float matrix X X^T: "
                          "check the calibration inputs for NaN/Inf (or overflow in float16)")
    if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
        raise WeightError(f"{what} has NaN/Inf or non-float entries (dtype {w.dtype}); quantization needs a "
                          "finite float weight: fix or reload the checkpoint")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ConfigError(f"damp={damp!r} is not a finite number >= 0; GPTQ adds damp * mean(diag(H)) to the "
                          "diagonal: use e.g. 0.01")


def gptq(w: torch.Tensor, gram: torch.Tensor, bits: int = 4, block: int = 32, symmetric: bool = True,
         damp: float = 0.01, what: str = "the weight") -> Grid:
    """GPTQ-quantize the 2-D weight ``w`` (out x in, blocks of ``block`` input columns) against the
    input Gram matrix ``gram`` (in x in). Returns the :class:`Grid` (codes int16, scales float32,
    zeros int16) whose ``dequantize()`` is the quantized weight.

    Inputs that never fire (``gram[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``, as in the
    reference implementation; ``damp * mean(diag(H))`` is added to the diagonal."""
    _check(w, gram, damp, what, bits, block)
    dev = w.device
    rows, cols = w.shape
    W = w.detach().to(device=dev, dtype=torch.float64).clone()
    H = gram.detach().to(device=dev, dtype=torch.float64).clone()
    H = (H + H.T) / 2  # guard against a slightly asymmetric accumulation

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.arange(cols, device=dev)
    H[diag, diag] += damp * torch.diagonal(H).mean()
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ConfigError(f"the Gram matrix for {what} is not positive definite after damping (damp={damp}): "
                          "GPTQ needs X X^T of real inputs: check the Gram accumulation or raise damp "
                          f"(e.g. 0.1) ({str(e).splitlines()[0]})") from None

    codes = torch.empty(rows, cols, dtype=torch.int16, device=dev)
    nblk = cols // block
    scales = torch.empty(rows, nblk, dtype=torch.float32, device=dev)
    zeros = torch.empty(rows, nblk, dtype=torch.int16, device=dev)
    lazy = max(block, (_LAZY // block) * block)

    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:  # params of the next block, from its current (updated) columns
                s, z = block_params(W1[:, i:i + block], bits, block, symmetric)
                g = col // block
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                s32, z32 = s[:, 0], z[:, 0].to(torch.float32)
            x = W1[:, i]
            q = codes_with(x.to(torch.float32), s32, z32, bits, symmetric)
            codes[:, col] = q
            deq = ((q.to(torch.float32) - z32) * s32).to(torch.float64)  # exactly grid.dequantize
            err = (x - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Grid(codes, scales, zeros, bits, block, symmetric)


def output_error(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``tr((W - Wq) G (W - Wq)^T) / tr(W G W^T)`` in float64 (0 when both
    are 0, inf when only the reference is 0)."""
    W = w.detach().to(torch.float64)
    D = W - wq.detach().to(device=W.device, dtype=torch.float64)
    G = gram.detach().to(device=W.device, dtype=torch.float64)
    num = float(((D @ G) * D).sum())
    den = float(((W @ G) * W).sum())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
