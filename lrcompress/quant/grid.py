"""Block-wise integer grids for weights (torch): the round-to-nearest rule of ONNX Runtime's
MatMulNBits / GatherBlockQuantized quantizers, so a weight quantized here runs on the runtime
with the same codes.

A weight ``w`` (rows x cols) is cut into blocks of ``block`` consecutive columns per row (for a
Linear weight (out, in): blocks along the input dimension, which is MatMulNBits' K axis).
Symmetric: ``scale = v / -2^(bits-1)`` with ``v`` the block's entry of largest magnitude (sign
kept), codes ``clip(round(w / scale), -2^(bits-1), 2^(bits-1) - 1)``, zero point 0 (stored as
``2^(bits-1)`` by the runtime). Asymmetric: the range [min(w, 0), max(w, 0)] is cut into
``2^bits - 1`` steps, zero point ``round(-min / scale)``, codes in [0, 2^bits - 1].
Rounding is numpy's (half to even), as the runtime's reference quantizer."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError

BITS = (4, 8)


class Grid(NamedTuple):
    """Codes (int16, rows x cols), scales and zero points (rows x blocks, float32 / int16)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    block: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for."""
        return dequantize(self.codes, self.scales, self.zeros, self.block)


def check_block(block: int, cols: int, what: str, bits: int = 4) -> None:
    """The runtime's rules (:func:`exporters.nbits.check_block`: bits 4 or 8, a power-of-two block >= 16
    that divides the blocked dimension), as a :class:`ConfigError`."""
    from exporters import BadInput
    from exporters.nbits import check_block as runtime_rule
    try:
        runtime_rule(block, cols, what, bits)
    except BadInput as e:
        raise ConfigError(str(e)) from None


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(rows, cols // block, block)


def block_params(w: torch.Tensor, bits: int, block: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (rows x blocks) of ``w``'s blocks by the round-to-nearest rule."""
    b = _blocks(w.detach().to(torch.float32), block)
    if symmetric:
        hi, lo = b.amax(-1), b.amin(-1)
        v = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = v / -float(2 ** (bits - 1))
        return scale, torch.zeros_like(scale, dtype=torch.int16)
    top = float(2 ** bits - 1)
    lo = torch.clamp(b.amin(-1), max=0.0)
    hi = torch.clamp(b.amax(-1), min=0.0)
    scale = (hi - lo) / top
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.where(scale == 0, torch.full_like(scale, 2 ** (bits - 1)), torch.round(-lo / safe))
    return scale, zero.clamp(0, top).to(torch.int16)


def to_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, block: int,
             symmetric: bool) -> torch.Tensor:
    """Integer codes of ``w`` (whole blocks) on the grid (scales, zeros): int16, same shape as ``w``
    (:func:`codes_with` rounds single columns, as GPTQ does)."""
    b = _blocks(w.detach().to(torch.float32), block)
    s, z = scales[..., None], zeros[..., None].to(torch.float32)
    return codes_with(b, s, z, bits, symmetric).reshape(w.shape)


def codes_with(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes of ``x`` under scales ``s`` and zero points ``z`` (broadcast): the rounding rule alone."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    if symmetric:
        half = 2 ** (bits - 1)
        q = torch.where(s == 0, torch.zeros_like(x), torch.round(x / safe)).clamp(-half, half - 1)
    else:
        q = torch.where(s == 0, z.expand_as(x), torch.round(x / safe + z)).clamp(0, 2 ** bits - 1)
    return q.to(torch.int16)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, block: int) -> torch.Tensor:
    """``scale * (code - zero)`` per block, float32 (rows x cols)."""
    rows, cols = codes.shape
    q = codes.to(torch.float32).reshape(rows, cols // block, block)
    return ((q - zeros[..., None].to(torch.float32)) * scales[..., None]).reshape(rows, cols)


def quantize(w: torch.Tensor, bits: int = 4, block: int = 32, symmetric: bool = True, what: str = "the weight") -> Grid:
    """Round-to-nearest block quantization of a 2-D weight (blocks along its columns)."""
    if w.dim() != 2:
        raise ConfigError(f"{what} has shape {tuple(w.shape)}; block quantization takes 2-D weights")
    check_block(block, w.shape[1], what, bits)
    scales, zeros = block_params(w, bits, block, symmetric)
    return Grid(to_codes(w, scales, zeros, bits, block, symmetric), scales, zeros, bits, block, symmetric)


def grid_bytes(rows: int, cols: int, bits: int, block: int, symmetric: bool) -> int:
    """Bytes the runtime stores: packed codes, one float32 scale per block (+ packed zero points)."""
    blocks = rows * (cols // block)
    return rows * cols * bits // 8 + 4 * blocks + (0 if symmetric else (blocks * bits + 7) // 8)
