"""Quantization next to low rank: block grids matching the runtime (``grid``), GPTQ on them
(``gptq``), the per-layer choices of a byte budget with low-rank corrections of the quantization
residual (``options``), the planner (``plan``) and the grids' file in a checkpoint (``store``)."""

from .grid import Grid, quantize
from .plan import BytePlan, apply_bytes, plan_bytes

__all__ = ["BytePlan", "Grid", "apply_bytes", "plan_bytes", "quantize"]
