"""The reference of a recovery run must be the student's original: a dense layer of the same
shape at every factorized layer, and the same dense parameters everywhere else."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..methods.kinds import is_linear, layer_matrix


def check_reference(student: nn.Module, teacher: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """The teacher must be the student's original: same dense parameters, and a dense layer
    of the same shape at every factorized layer (``layers``: the student's manifest entries)."""
    names = list(layers)
    t_mods = dict(teacher.named_modules())
    for name in names:
        info = layers[name]
        t = t_mods.get(name)
        shape = info.get("shape")
        if not isinstance(t, (nn.Conv2d, nn.Embedding)) and not is_linear(t):
            raise ConfigError(f"--reference has no dense layer {name!r} (the student factorized one there); "
                              "pass the model the checkpoint was compressed from")
        if shape is not None and info["kind"] in ("linear", "conv1x1", "embedding", "shared_linear"):
            want = list(layer_matrix(t).shape)
            if info["kind"] == "embedding":
                want = list(t.weight.shape)
            if want != list(shape):
                raise ConfigError(f"--reference layer {name!r} has shape {want}, the student's factorized layer "
                                  f"{list(shape)}; pass the model the checkpoint was compressed from")
    inside = tuple(n + "." for n in names)
    t_params = dict(teacher.named_parameters())
    for pname, p in student.named_parameters():
        if pname.startswith(inside):
            continue
        q = t_params.get(pname)
        if q is None or q.shape != p.shape:
            got = "missing" if q is None else f"shape {list(q.shape)}"
            raise ConfigError(f"--reference does not match the student: parameter {pname!r} is {got} there, "
                              f"{list(p.shape)} in the student; pass the model the checkpoint was compressed from")
