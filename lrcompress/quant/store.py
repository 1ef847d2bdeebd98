"""The integer grids of a ``--budget bytes`` checkpoint: ``quant.safetensors`` (codes, scales, zero
points per quantized parameter) beside ``model.safetensors`` (the same weights as float32, exactly
on their grids: what torch runs), described in the manifest's ``quantization`` entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .grid import Grid, dequantize

GRIDS = "quant.safetensors"


def grid_entries(grids: dict[str, Grid]) -> dict[str, dict[str, Any]]:
    """The manifest's ``quantization`` entry: per parameter its bits, block and symmetry."""
    return {name: {"bits": g.bits, "block": g.block, "symmetric": g.symmetric} for name, g in sorted(grids.items())}


def write_grids(grids: dict[str, Grid], path: Path) -> None:
    """Codes (int16), scales (float32) and zero points (int16) of every grid, in one safetensors file."""
    from safetensors.torch import save_file
    tensors: dict[str, torch.Tensor] = {}
    for name, g in grids.items():
        tensors[f"{name}.codes"] = g.codes.to(torch.int16).contiguous()
        tensors[f"{name}.scales"] = g.scales.to(torch.float32).contiguous()
        tensors[f"{name}.zeros"] = g.zeros.to(torch.int16).contiguous()
    save_file(tensors, str(path), metadata={"format": "lrcompress-grids/1"})


def read_grids(folder: str | Path, model: nn.Module, entries: dict[str, Any]) -> dict[str, Grid]:
    """The grids of a checkpoint, each checked against the parameter it stands for (same shape, and the
    parameter is exactly its dequantized codes); a damaged or edited file is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(folder) / GRIDS
    where = f"{str(path)!r}"
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"the manifest's quantization entry of {str(folder)!r} is damaged; re-run lrcompress compress")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{where} cannot be read ({str(e).splitlines()[0]}); re-run lrcompress compress") from None
    params = dict(model.named_parameters())
    out: dict[str, Grid] = {}
    for name, info in entries.items():
        try:
            bits, block, sym = int(info["bits"]), int(info["block"]), bool(info["symmetric"])
            codes, scales, zeros = (tensors[f"{name}.{k}"] for k in ("codes", "scales", "zeros"))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where} or the manifest lacks the grid of {name!r}; re-run lrcompress compress") from None
        p = params.get(name)
        if p is None or p.dim() != 2 or tuple(codes.shape) != tuple(p.shape) or bits not in (4, 8) or block < 1 \
                or p.shape[1] % block or tuple(scales.shape) != (p.shape[0], p.shape[1] // block) \
                or tuple(zeros.shape) != tuple(scales.shape):
            raise CheckpointError(f"{where}: the grid of {name!r} does not fit the model's parameter; the checkpoint "
                                  "is damaged or mixed from two runs: re-run lrcompress compress")
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
        if int(codes.min()) < lo or int(codes.max()) > hi or not torch.isfinite(scales).all():
            raise CheckpointError(f"{where}: codes of {name!r} fall outside int{bits} or scales are not finite; "
                                  "re-run lrcompress compress")
        if not torch.equal(dequantize(codes, scales, zeros, block), p.detach().to(torch.float32)):
            raise CheckpointError(f"{where}: the codes of {name!r} do not reproduce its weight in model.safetensors; "
                                  "one of the two files was changed: re-run lrcompress compress")
        out[name] = Grid(codes, scales, zeros, bits, block, sym)
    return out


def export_table(grids: dict[str, Grid]) -> dict[str, Any]:
    """The exporters' codes table: each grid keyed by the digest of the float weight it stands for."""
    from exporters.nbits import Codes, digest
    table = {}
    for g in grids.values():
        view = g.dequantize().numpy()
        table[digest(view)] = Codes(g.codes.numpy(), g.scales.numpy(), None if g.symmetric else g.zeros.numpy(),
                                    g.bits, g.block)
    return table


def checkpoint_grids(source: str, model: nn.Module) -> dict[str, Any] | None:
    """The exporters' codes table of a ``--budget bytes`` checkpoint folder (None for any other source)."""
    import json
    path = Path(source) / "lrcompress.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # loading the checkpoint already refused a damaged manifest
    entries = manifest.get("quantization") if isinstance(manifest, dict) else None
    if entries is None:
        return None
    grids = read_grids(source, model, entries)
    plan = manifest.get("plan")
    check_against_plan(source, grids, plan.get("bytes") if isinstance(plan, dict) else None)
    return export_table(grids)


def check_against_plan(source: str, grids: dict[str, Grid], plan: Any) -> None:
    """The grids must be exactly those the byte plan's choices imply, with their bit widths."""
    from .plan import expected_grids
    rows = plan.get("layers") if isinstance(plan, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"name", "kind", "choice"} <= set(r) for r in rows):
        raise CheckpointError(f"the manifest of {str(source)!r} holds grids but no byte plan to check them against; "
                              "the manifest is damaged or edited: re-run lrcompress compress")
    want = expected_grids(rows, {r["name"]: r.get("layer", "linear") for r in rows})
    have = {n: g.bits for n, g in grids.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise CheckpointError(f"the grids of {str(source)!r} do not match its byte plan (first difference: "
                              f"{diff[0][0]!r}); the manifest or quant.safetensors was edited: re-run lrcompress compress")
