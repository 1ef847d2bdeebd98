"""LoRA residual recovery: distil the compressed student against the original, then fold.

Single process or under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU):
every global batch is split evenly over the ranks and the loss is a mean over examples, so
the averaged gradient equals the single-process one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import Calibration, calibrate
from .config import RecoveryConfig
from .data import Batch, TensorData, TextData
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .layers import LowRankEmbedding
from .lora import MATRIX_LAYERS, LoRA, attach, balance, detach_all, factor_params, factors, residual_chunk, set_factors, zero_chunk
from .methods.lowrank import Metric
from .targets import layer_matrix

Data = TextData | TensorData


# ---------------------------------------------------------------- model structure


def factorized_names(model: nn.Module) -> list[str]:
    """Names of the factorized modules (any kind lrcompress writes)."""
    from .checkpoint import factorized_layers
    return list(factorized_layers(model))


def check_reference(student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
    """The teacher must be the student's original: same dense parameters, and a dense layer
    of the same shape at every factorized layer's name."""
    from .checkpoint import factorized_layers
    layers = factorized_layers(student)
    t_mods = dict(teacher.named_modules())
    for name in names:
        info = layers[name]
        t = t_mods.get(name)
        shape = info.get("shape")
        if not isinstance(t, (nn.Linear, nn.Conv2d, nn.Embedding)):
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


# ---------------------------------------------------------------- outputs and loss


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


# ---------------------------------------------------------------- data


def split_data(data: Data, config: RecoveryConfig, eval_data: Data | None) -> tuple[Data, Data]:
    """Training and held-out data: ``eval_data`` when given, else a seeded
    ``eval_fraction`` of ``data`` that training never sees."""
    if eval_data is None:
        n = len(data)
        n_eval = max(1, round(n * config.eval_fraction))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
        train_idx, eval_idx = sorted(order[n_eval:]), sorted(order[:n_eval])
        data, eval_data = _subset(data, train_idx), _subset(data, eval_idx)
    if len(data) < config.batch_size:
        raise DataError(f"recovery has {len(data)} training examples, fewer than one batch (--batch-size "
                        f"{config.batch_size}); give more data or a smaller --batch-size")
    return data, eval_data


def _subset(data: Data, idx: list[int]) -> Data:
    if isinstance(data, TextData):
        return TextData([data.lines[i] for i in idx], data.tokenizer, data.max_length)
    return TensorData({k: a[idx] for k, a in data.arrays.items()}, data.source)


def fixed_batches(data: Data, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of each training batch: one seeded shuffle, then within runs of 8
    batches text is sorted by length (less padding per batch); full batches only."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    if isinstance(data, TextData):
        run = batch_size * 8
        order = [i for k in range(0, len(order), run)
                 for i in sorted(order[k:k + run], key=lambda j: (len(data.lines[j]), j))]
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def replace_tokens(batch: Batch, tokenizer: Any, share: float, seed: int) -> Batch:
    """Replace ``share`` of the real, non-special tokens by random vocabulary tokens."""
    ids = batch.inputs.get("input_ids")
    if ids is None or batch.mask is None:
        return batch
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []))), dtype=ids.dtype)
    pick = (torch.rand(ids.shape, generator=g) < share) & batch.mask & ~torch.isin(ids, special)
    vocab = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    new = torch.randint(0, vocab, ids.shape, generator=g, dtype=ids.dtype)
    new = torch.where(torch.isin(new, special), ids, new)
    return Batch({**batch.inputs, "input_ids": torch.where(pick, new, ids)}, batch.mask)


def make_batch(data: Data, idx: list[int]) -> Batch:
    return next(iter(_subset(data, idx).batches(len(idx))))


# ---------------------------------------------------------------- report


@dataclass
class RecoveryReport:
    """What a recovery run did: evaluation curve, before/after, params, timing."""

    config: dict[str, Any]
    steps: int = 0
    best_step: int = 0
    stopped: str = ""
    adapted_layers: int = 0
    trained_params: int = 0
    params_before: int = 0
    params_after: int = 0
    world_size: int = 1
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    start: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    after_fold: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [f"{'':22} {'eval loss':>10} {'cos mean':>9} {'cos worst':>9}"]
        for label, d in (("before", self.before), ("start (adapters init)", self.start if self.adapted_layers else {}),
                         (f"best (step {self.best_step})", self.best),
                         ("after fold", self.after_fold)):
            if d:
                rows.append(f"{label:22} {d['loss']:10.5f} {d['cos_mean']:9.4f} {d['cos_worst']:9.4f}")
        rows.append(f"steps {self.steps} ({self.stopped}), {self.seconds_per_step:.3f} s/step, "
                    f"{self.adapted_layers} adapters, trained params {self.trained_params:,}, "
                    f"params {self.params_before:,} -> {self.params_after:,}")
        return "\n".join(rows)

    def plot(self, path: str | Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        tr = [c for c in self.curve if "train_loss" in c]
        ev = [c for c in self.curve if "cos_mean" in c]
        ax[0].plot([c["step"] for c in tr], [c["train_loss"] for c in tr], label="train")
        ax[0].plot([c["step"] for c in ev], [c["loss"] for c in ev], "o-", label="held out")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("distillation loss")
        ax[0].legend()
        ax[1].plot([c["step"] for c in ev], [c["cos_mean"] for c in ev], "o-", label="mean")
        ax[1].plot([c["step"] for c in ev], [c["cos_worst"] for c in ev], "o-", label="worst")
        ax[1].set_xlabel("step")
        ax[1].set_ylabel("held-out cosine vs original")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("LRCOMPRESS_DEVICE", "cpu") != "cpu" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_min(value: float, device: torch.device) -> float:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t)


# ---------------------------------------------------------------- training


class _Trainer:
    def __init__(self, student: nn.Module, teacher: nn.Module, train: Data, held: Data, config: RecoveryConfig,
                 metrics: dict[str, Metric | None], names: list[str], device: torch.device,
                 rank: int, world: int) -> None:
        self.student, self.teacher, self.train, self.held, self.c = student, teacher, train, held, config
        self.metrics, self.names, self.device, self.rank, self.world = metrics, names, device, rank, world
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
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.c.bf16 else _null()
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
        sums = _all_sum(sums, self.device)
        worst = _all_min(worst, self.device)
        return {"loss": sums[0] / sums[2], "cos_mean": sums[1] / sums[2], "cos_worst": worst}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


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


def _lr_factor(step: int, config: RecoveryConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of --lr."""
    w = config.warmup_steps
    if step < w:
        return (step + 1) / w
    frac = (step - w) / max(config.steps - w, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _fingerprint(student: nn.Module, teacher: nn.Module, train: Data, config: RecoveryConfig, world: int) -> str:
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
    rank, world = dist_info()
    if world > 1 and config.rank_schedule:
        raise ConfigError("--rank-schedule is not supported under torchrun (DistributedDataParallel cannot add "
                          "parameters mid-run); drop it or run in one process")
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} is not divisible by the {world} processes; use a "
                          f"multiple of {world}")
    names = factorized_names(student)
    if not names:
        raise CheckpointError("the student has no factorized layers; recover a model written by lrcompress compress")
    check_reference(student, teacher, names)
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
    from .apply import set_module
    for n in matrix if config.balance else []:
        mod = student.get_submodule(n)
        new = set_factors(mod, *balance(*factors(mod))).to(device)
        set_module(student, n, new)

    if not resume:  # the student as compressed, before any adapter
        student.eval()
        report_before = _Trainer(student, teacher, train, held, config, metrics, names, device, rank, world).evaluate()
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
    tr = _Trainer(trainer_model, teacher, train, held, config, metrics, names, device, rank, world)
    hooks = _feature_hooks(student, teacher, names, tr) if config.feature_weight else []
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))

    report = RecoveryReport(config=config.to_dict(), adapted_layers=len(adapters), world_size=world,
                            trained_params=sum(p.numel() for p in trainable), params_before=params_before)
    step, best_state, bad_evals = 0, None, 0
    fp = _fingerprint(student, teacher, train, config, world) if state_path is not None else ""
    if resume:
        step, best_state, bad_evals = _load_state(state_path, fp, student, opt, report, adapters, trainable)
    else:
        best_state = _snapshot(trainable)
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
            lval = _all_sum([float(loss.detach())], device)[0] / world
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
                    best_state = _snapshot(trainable)
                else:
                    bad_evals += 1
                if state_path is not None and rank == 0:
                    _save_state(state_path, fp, step, student, opt, report, best_state, bad_evals, adapters)
                if progress:
                    progress(step, {"loss": lval, **ev})
                if config.patience and bad_evals >= config.patience:
                    report.stopped = f"early stop: no held-out improvement in {bad_evals} evaluations"
                    break
            elif progress:
                progress(step, {"loss": lval})
    except _NaN as e:
        if best_state is not None:
            _restore(trainable, best_state)
        if state_path is not None and rank == 0:
            _save_state(state_path, fp, report.best_step, student, None, report, best_state, 0, adapters)
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
        _restore(trainable, best_state)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if adapters:
        ranks = {n: (ranks_before[n] if config.fold == "budget" else None) for n in adapters}
        detach_all(student, ranks, metrics)
    report.after_fold = _Trainer(student, teacher, train, held, config, metrics, names, device, rank, world).evaluate()
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
    from .planning import layer_metric
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


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    """Load a snapshot; adapter chunks grown after it (the tail of ``params``) are zeroed,
    which is what they contributed at the snapshot: nothing."""
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
        for p in params[len(state):]:
            p.zero_()


def _save_state(path: str | Path, fp: str, step: int, student: nn.Module, opt: torch.optim.Optimizer | None,
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


def _load_state(path: str | Path | None, fp: str, student: nn.Module, opt: torch.optim.Optimizer,
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


