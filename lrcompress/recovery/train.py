"""LoRA residual recovery: distil the compressed student against the original, then fold.

Single process or under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU):
every global batch is split evenly over the ranks and the loss is a mean over examples, so
the averaged gradient equals the single-process one.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..calibration.calibrate import Calibration, calibrate
from ..config import RecoveryConfig
from ..decompose.lowrank import Metric
from ..errors import CheckpointError, ConfigError, TrainingError
from ..io.checkpoint import factorized_layers
from ..io.data import Batch, TextData
from ..io.distributed import all_min, all_sum, dist_info, init_distributed
from ..methods.apply import set_module
from ..planning.make_plan import layer_metric
from ..planning.targets import layer_matrix
from .distill import (
    example_cosine,
    loss_terms,
    main_output,
    ortho_penalty,
    per_example_loss,
)
from .lora import (
    MATRIX_LAYERS,
    LoRA,
    attach,
    balance,
    detach_all,
    factors,
    residual_chunk,
    set_factors,
    zero_chunk,
)
from .report import RecoveryReport
from .state import fingerprint, load_state, restore, save_state, snapshot
from .reference import check_reference
from .train_data import Data, fixed_batches, make_batch, replace_tokens, split_data

__all__ = ["RecoveryConfig", "RecoveryReport", "check_reference", "dist_info", "main_output", "ortho_penalty",
           "per_example_loss", "recover", "replace_tokens"]


class _Trainer:
    def __init__(self, student: nn.Module, teacher: nn.Module, train: Data, held: Data, config: RecoveryConfig,
                 device: torch.device, rank: int, world: int) -> None:
        self.student, self.teacher, self.train, self.held, self.c = student, teacher, train, held, config
        self.device, self.rank, self.world = device, rank, world
        self.batches = fixed_batches(train, config.batch_size, config.seed)
        self.terms: tuple[str, ...] | None = None
        self.cache: dict[int, torch.Tensor] = {}
        self.features: dict[str, list[torch.Tensor]] = {"s": [], "t": []}

    # data for this rank: every global batch is split evenly over the ranks
    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank::self.world]

    def batch_at(self, step: int) -> tuple[int, Batch]:
        n = len(self.batches)
        epoch, pos = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.c.seed * 1000003 + epoch)).tolist()
        bid = order[pos]
        batch = make_batch(self.train, self.shard(self.batches[bid]))
        if self.c.augment and isinstance(self.train, TextData):
            batch = replace_tokens(batch, self.train.tokenizer, self.c.augment,
                                   self.c.seed * 1000003 + step * 101 + self.rank)
        return bid, batch.to(self.device)

    @torch.no_grad()
    def teacher_out(self, bid: int | None, batch: Batch) -> torch.Tensor:
        cacheable = bid is not None and not self.c.feature_weight and not self.c.augment
        if cacheable and bid in self.cache:
            return self.cache[bid]
        out = main_output(batch.run(self.teacher)).detach()
        if cacheable:
            self.cache[bid] = out
        return out

    def loss(self, model: nn.Module, batch: Batch, t: torch.Tensor) -> torch.Tensor:
        self.features["s"].clear()
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.c.bf16 else contextlib.nullcontext()
        with ctx:
            s = main_output(batch.run(model))
        if self.terms is None:
            self.terms = loss_terms(self.c, s, batch.mask)
        loss = per_example_loss(s, t, batch.mask, self.terms).mean()
        if self.c.feature_weight:
            fl = [((a.float() - b.float()) ** 2).sum() / (b.float() ** 2).sum().clamp_min(1e-12)
                  for a, b in zip(self.features["s"], self.features["t"])]
            loss = loss + self.c.feature_weight * torch.stack(fl).mean()
        if self.c.ortho_weight:
            loss = loss + self.c.ortho_weight * ortho_penalty(self.student_core())
        return loss

    def student_core(self) -> nn.Module:
        return self.student.module if hasattr(self.student, "module") else self.student

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.student_core()
        sums = [0.0, 0.0, 0.0]  # loss sum, cos sum, count
        worst = math.inf
        idx = list(range(len(self.held)))
        bs = max(self.c.batch_size, 32)
        for i in range(0, len(idx), bs):
            b = make_batch(self.held, self.shard(idx[i:i + bs])) if self.shard(idx[i:i + bs]) else None
            if b is None:
                continue
            b = b.to(self.device)
            t = main_output(b.run(self.teacher))
            s = main_output(b.run(model))
            terms = self.terms or loss_terms(self.c, s, b.mask)
            ls = per_example_loss(s, t, b.mask, terms)
            cos = example_cosine(s, t, b.mask)
            sums[0] += float(ls.sum())
            sums[1] += float(cos.sum())
            sums[2] += len(ls)
            worst = min(worst, float(cos.min()))
        sums = all_sum(sums, self.device)
        worst = all_min(worst, self.device)
        return {"loss": sums[0] / sums[2], "cos_mean": sums[1] / sums[2], "cos_worst": worst}


def _lr_factor(step: int, config: RecoveryConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of --lr."""
    w = config.warmup_steps
    if step < w:
        return (step + 1) / w
    frac = (step - w) / max(config.steps - w, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def recover(student: nn.Module, teacher: nn.Module, data: Data, config: RecoveryConfig, *,
            eval_data: Data | None = None, calibration: Calibration | None = None,
            device: str | torch.device = "cpu", state_path: str | Path | None = None, resume: bool = False,
            progress: Callable[[int, dict[str, Any]], None] | None = None) -> RecoveryReport:
    """Distil ``student`` (a compressed model, changed in place) against ``teacher`` on
    ``data``; adapters are folded back before returning. ``state_path`` keeps a resumable
    state at every evaluation (the caller deletes it once the result is saved); ``resume``
    continues from it. The teacher is left as it was (mode, requires_grad)."""
    flags, mode = [p.requires_grad for p in teacher.parameters()], teacher.training
    try:
        return _recover(student, teacher, data, config, eval_data=eval_data, calibration=calibration, device=device,
                        state_path=state_path, resume=resume, progress=progress)
    finally:  # the teacher is the caller's model: leave it as it was
        for p, f in zip(teacher.parameters(), flags):
            p.requires_grad_(f)
        teacher.train(mode)


def _recover(student: nn.Module, teacher: nn.Module, data: Data, config: RecoveryConfig, *,
            eval_data: Data | None = None, calibration: Calibration | None = None,
            device: str | torch.device = "cpu", state_path: str | Path | None = None, resume: bool = False,
            progress: Callable[[int, dict[str, Any]], None] | None = None) -> RecoveryReport:
    device = torch.device(device)
    rank, world = init_distributed()
    if world > 1 and config.rank_schedule:
        raise ConfigError("--rank-schedule is not supported under torchrun (DistributedDataParallel cannot add "
                          "parameters mid-run); drop it or run in one process")
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} is not divisible by the {world} processes; use a "
                          f"multiple of {world}")
    layers = factorized_layers(student)
    names = list(layers)
    if not names:
        raise CheckpointError("the student has no factorized layers; recover a model written by lrcompress compress")
    check_reference(student, teacher, layers)
    matrix = [n for n in names if isinstance(student.get_submodule(n), MATRIX_LAYERS)]
    if config.uses_lora and not matrix:
        raise ConfigError("--train lora needs two-factor layers (svd, svd-whiten); this model has only tensor "
                          "or shared layers: use --train factors")
    if config.uses_lora:
        for n in matrix:
            a, b = factors(student.get_submodule(n))
            cap = min(a.shape[0], b.shape[1]) - a.shape[1]
            top = max((r for _, r in config.rank_schedule), default=config.lora_rank)
            if top > cap:
                raise ConfigError(f"--lora-rank {top} is too large for layer {n!r} ({a.shape[0]}x{b.shape[1]} at rank "
                                  f"{a.shape[1]} leaves {cap}); use --lora-rank <= {max(cap, 0)}")
    train, held = split_data(data, config, eval_data)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(device)
    ranks_before = {n: factors(student.get_submodule(n))[0].shape[1] for n in matrix}
    params_before = sum(p.numel() for p in student.parameters())

    metrics: dict[str, Metric | None] = {n: None for n in matrix}
    if matrix and config.uses_lora and (config.init == "residual" or config.fold == "budget"):
        metrics = layer_metrics(teacher, matrix, train, calibration, config, device)
    # balanced gauge before training (Adam steps are scale-blind: an unbalanced pair moves
    # its small factor by a huge relative amount)
    for n in matrix if config.balance else []:
        mod = student.get_submodule(n)
        new = set_factors(mod, *balance(*factors(mod))).to(device)
        set_module(student, n, new)

    if not resume:  # the student as compressed, before any adapter
        student.eval()
        report_before = _Trainer(student, teacher, train, held, config, device, rank, world).evaluate()
    adapters: dict[str, LoRA] = {}
    gen = torch.Generator().manual_seed(config.seed)
    if config.uses_lora:
        adapters = attach(student, matrix)
        for n, lora in adapters.items():
            _grow(lora, n, config.lora_rank, teacher, metrics.get(n), config, gen)
    for p in student.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    if config.train in ("factors", "both"):
        for n in names:
            mod = student.get_submodule(n)
            mod = mod.base if isinstance(mod, LoRA) else mod
            trainable += list(mod.parameters())
    if config.train == "all":
        trainable = list(student.parameters())
    if config.uses_lora:
        for lora in adapters.values():
            trainable += list(lora.ups) + list(lora.downs)
    for p in trainable:
        p.requires_grad_(True)
    student.train(config.dropout)

    trainer_model: nn.Module = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trainer_model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    tr = _Trainer(trainer_model, teacher, train, held, config, device, rank, world)
    hooks = _feature_hooks(student, teacher, names, tr) if config.feature_weight else []
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))

    report = RecoveryReport(config=config.to_dict(), adapted_layers=len(adapters), world_size=world,
                            trained_params=sum(p.numel() for p in trainable), params_before=params_before)
    step, best_state, bad_evals = 0, None, 0
    fp = fingerprint(student, teacher, train, config, world) if state_path is not None else ""
    if resume:
        step, best_state, bad_evals = load_state(state_path, fp, student, opt, report, adapters, trainable)
    else:
        best_state = snapshot(trainable)
        report.before = report_before
        report.start = tr.evaluate() if adapters else dict(report_before)
        report.best = dict(report.start)
        report.curve.append({"step": 0, **report.start})
    t0 = time.perf_counter()
    start_step = step
    try:
        while step < config.steps:
            for at, new_rank in config.rank_schedule:
                if step == at:
                    for n, lora in adapters.items():
                        u, d = _grow(lora, n, new_rank - lora.rank, teacher, metrics.get(n), config, gen)
                        opt.add_param_group({"params": [u, d], "lr": config.lr, "weight_decay": config.weight_decay})
                        trainable += [u, d]
            for g in opt.param_groups:
                g["lr"] = config.lr * _lr_factor(step, config)
            bid, batch = tr.batch_at(step)
            t = tr.teacher_out(bid, batch)
            loss = tr.loss(trainer_model, batch, t)
            lval = all_sum([float(loss.detach())], device)[0] / world
            if not math.isfinite(lval):
                raise _NaN(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.clip)
            opt.step()
            step += 1
            report.curve.append({"step": step, "train_loss": lval})
            if step % config.eval_every == 0 or step == config.steps:
                ev = tr.evaluate()
                if not math.isfinite(ev["loss"]):
                    raise _NaN(step)
                report.curve.append({"step": step, **ev})
                if ev["loss"] < report.best["loss"] * (1 - 1e-4):
                    report.best, report.best_step, bad_evals = dict(ev), step, 0
                    best_state = snapshot(trainable)
                else:
                    bad_evals += 1
                if state_path is not None and rank == 0:
                    save_state(state_path, fp, step, student, opt, report, best_state, bad_evals, adapters)
                if progress:
                    progress(step, {"loss": lval, **ev})
                if config.patience and bad_evals >= config.patience:
                    report.stopped = f"early stop: no held-out improvement in {bad_evals} evaluations"
                    break
            elif progress:
                progress(step, {"loss": lval})
    except _NaN as e:
        if best_state is not None:
            restore(trainable, best_state)
        if state_path is not None and rank == 0:
            save_state(state_path, fp, report.best_step, student, None, report, best_state, 0, adapters)
        kept = f"the last good state (step {report.best_step}) is kept in {str(state_path)!r}" if state_path else \
            f"the student was reset to its best state (step {report.best_step})"
        raise TrainingError(f"the distillation loss became NaN/Inf at step {e.step + 1} with --lr {config.lr:g}; "
                            f"{kept}; lower --lr (e.g. {config.lr / 10:g})") from None
    finally:
        for h in hooks:
            h.remove()
    report.steps = step
    report.stopped = report.stopped or "all steps"
    took = time.perf_counter() - t0
    report.seconds = took
    report.seconds_per_step = took / max(step - start_step, 1)
    if best_state is not None:
        restore(trainable, best_state)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if adapters:
        ranks = {n: (ranks_before[n] if config.fold == "budget" else None) for n in adapters}
        detach_all(student, ranks, metrics)
    report.after_fold = _Trainer(student, teacher, train, held, config, device, rank, world).evaluate()
    report.params_after = sum(p.numel() for p in student.parameters())
    for p in student.parameters():
        p.requires_grad_(True)
    return report


class _NaN(Exception):
    def __init__(self, step: int) -> None:
        self.step = step


def layer_metrics(teacher: nn.Module, names: list[str], train: Data, calibration: Calibration | None,
                  config: RecoveryConfig, device: torch.device) -> dict[str, Metric | None]:
    """Input metrics of the factorized layers (from ``calibration`` or the teacher on ``train``)."""
    missing = [n for n in names if calibration is None or n not in calibration]
    if missing:
        calibration = calibrate(teacher, train.batches(max(config.batch_size, 32)), missing, device=device)
    return {n: layer_metric(teacher.get_submodule(n), n, calibration, 0.1) for n in names}


def _grow(lora: LoRA, name: str, k: int, teacher: nn.Module, metric: Metric | None, config: RecoveryConfig,
          gen: torch.Generator) -> tuple[nn.Parameter, nn.Parameter]:
    """Add ``k`` adapter directions: the top residual directions of W - (A B + U D), or zero-init."""
    a, b = factors(lora.base)
    if config.init == "zero":
        return lora.grow(*zero_chunk(a.shape[0], b.shape[1], k, gen))
    w = layer_matrix(teacher.get_submodule(name)).detach().double().cpu()
    current = a.cpu() @ b.cpu()
    if lora.rank:
        u, d = lora.delta()
        current = current + u.detach().double().cpu() @ d.detach().double().cpu()
    return lora.grow(*residual_chunk(w - current, k, metric, config.init_scale))


def _feature_hooks(student: nn.Module, teacher: nn.Module, names: list[str], tr: _Trainer) -> list[Any]:
    hooks = []
    for n in names:
        hooks.append(student.get_submodule(n).register_forward_hook(lambda m, i, o: tr.features["s"].append(o)))

        def keep(m: nn.Module, i: Any, o: torch.Tensor) -> None:
            tr.features["t"].append(o.detach())
        hooks.append(teacher.get_submodule(n).register_forward_hook(keep))
    orig = tr.teacher_out

    def teacher_out(bid: int | None, batch: Batch) -> torch.Tensor:
        tr.features["t"].clear()
        return orig(bid, batch)
    tr.teacher_out = teacher_out  # type: ignore[method-assign]
    return hooks
