"""Resumable recovery state: snapshots of trained parameters, the state file, its fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import RecoveryConfig
from ..errors import CheckpointError, ConfigError
from ..io.data import TextData
from .lora import LoRA, factors
from .report import RecoveryReport
from .train_data import Data


def fingerprint(student: nn.Module, teacher: nn.Module, train: Data, config: RecoveryConfig, world: int) -> str:
    """What a resumed run must share with the interrupted one (lr and steps may change)."""
    h = hashlib.sha256()
    for model in (student, teacher):
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().float().sum().double().cpu().numpy().tobytes())
    h.update(json.dumps(train.lines if isinstance(train, TextData) else sorted(train.arrays)).encode())
    keep = {k: v for k, v in config.to_dict().items() if k not in ("steps", "lr", "eval_every", "patience", "warmup")}
    h.update(json.dumps(keep, sort_keys=True).encode())
    h.update(str(world).encode())
    return h.hexdigest()


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def restore(params: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    """Load a snapshot; adapter chunks grown after it (the tail of ``params``) are zeroed,
    which is what they contributed at the snapshot: nothing."""
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
        for p in params[len(state):]:
            p.zero_()


def save_state(path: str | Path, fp: str, step: int, student: nn.Module, opt: torch.optim.Optimizer | None,
                report: RecoveryReport, best: list[torch.Tensor] | None, bad_evals: int,
                adapters: dict[str, LoRA]) -> None:
    path = Path(path)
    blob = {"fingerprint": fp, "step": step, "model": student.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "report": json.dumps(report.to_dict()), "best": best, "bad_evals": bad_evals,
            "lora_ranks": {n: [u.shape[1] for u in l.ups] for n, l in adapters.items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path | None, fp: str, student: nn.Module, opt: torch.optim.Optimizer,
                report: RecoveryReport, adapters: dict[str, LoRA],
                trainable: list[nn.Parameter]) -> tuple[int, list[torch.Tensor] | None, int]:
    if path is None or not Path(path).is_file():
        raise ConfigError(f"--resume given but there is no recovery state at {str(path)!r}; run without --resume")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"recovery state {str(path)!r} is unreadable ({str(e).splitlines()[0][:100]}); "
                              "delete it and run without --resume") from None
    if not isinstance(blob, dict) or blob.get("fingerprint") != fp:
        raise ConfigError(f"recovery state {str(path)!r} belongs to another run (different model, data or "
                          "settings); delete it or run without --resume")
    ranks = blob["lora_ranks"]
    chunks = max((len(v) for v in ranks.values()), default=0)
    for j in range(min(len(l.ups) for l in adapters.values()) if adapters else 0, chunks):
        for n, lora in adapters.items():  # re-grow what the rank schedule had added, in the same order
            k = ranks[n][j]
            a, b = factors(lora.base)
            u, d = lora.grow(torch.zeros(a.shape[0], k), torch.zeros(k, b.shape[1]))
            opt.add_param_group({"params": [u, d], "lr": opt.defaults["lr"], "weight_decay": opt.defaults["weight_decay"]})
            trainable += [u, d]
    student.load_state_dict(blob["model"])
    if blob["optimizer"] is not None:
        opt.load_state_dict(blob["optimizer"])
    saved = json.loads(blob["report"])
    for k in ("before", "start", "best", "best_step", "curve"):
        setattr(report, k, saved[k])
    return int(blob["step"]), blob["best"], int(blob["bad_evals"])
