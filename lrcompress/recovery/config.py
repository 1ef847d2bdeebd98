"""RecoveryConfig: what LoRA residual recovery trains, how long, with which losses; a frozen
dataclass validated on construction that round-trips through dict/JSON."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..checks import _check_int, _check_keys, _check_number, check_seed
from ..errors import ConfigError

TRAIN_MODES = ("factors", "lora", "both", "all")
LORA_INITS = ("residual", "zero")
FOLDS = ("budget", "exact")
LOSS_TERMS = ("hidden", "pooled", "kl")


@dataclass(frozen=True)
class RecoveryConfig:
    """LoRA residual recovery: distil the compressed student against the original.

    train: what is trained -- "factors" (the factorized layers' own weights), "lora"
    (adapters only, factors frozen), "both", or "all" (every student parameter: factors,
    dense layers, norms and biases; no adapters). init: adapters start at the top residual
    directions of W - W' in the whitened metric ("residual") or at zero ("zero", classic
    LoRA). fold: adapters fold back re-truncated to each layer's rank before recovery
    ("budget") or exactly, at rank r + lora_rank ("exact"). loss: terms among "hidden"
    (per-token cosine + normalised MSE of the output), "pooled" (cosine of the masked mean
    over tokens), "kl" (KL divergence of softmax outputs, for logits); empty = hidden+pooled
    for token outputs, hidden otherwise. augment: share of the real tokens of each text
    training batch replaced by random vocabulary tokens (the teacher labels any input, so
    this widens the data the student is matched on). rank_schedule: ((step, total_lora_rank), ...) grows
    the adapters at those steps. dropout: run the student in train mode (off by default:
    dropout noise against a deterministic teacher measurably hurts).
    """

    steps: int = 300
    lr: float = 3e-4
    lora_rank: int = 8
    train: str = "factors"
    init: str = "residual"
    init_scale: float = 1.0
    fold: str = "budget"
    batch_size: int = 16
    max_length: int = 128
    eval_every: int = 100
    eval_fraction: float = 0.1
    patience: int = 5
    warmup: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0
    loss: tuple[str, ...] = ()
    feature_weight: float = 0.0
    ortho_weight: float = 0.0
    rank_schedule: tuple[tuple[int, int], ...] = ()
    augment: float = 0.0
    bf16: bool = False
    dropout: bool = False
    balance: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("--steps", self.steps, 1, "300")
        _check_int("--lora-rank", self.lora_rank, 1, "8")
        _check_int("--batch-size", self.batch_size, 1, "16")
        _check_int("--max-length", self.max_length, 1, "128")
        _check_int("--eval-every", self.eval_every, 1, "100")
        _check_int("--patience", self.patience, 0, "5 (0 = never stop early)")
        check_seed("--seed", self.seed)
        if self.warmup is not None:
            _check_int("--warmup", self.warmup, 0, "30")
        lr = _check_number("--lr", self.lr)
        if lr <= 0:
            raise ConfigError(f"--lr {self.lr!r} must be > 0; e.g. --lr 1e-4")
        for flag, v in (("--weight-decay", self.weight_decay), ("--feature-weight", self.feature_weight),
                        ("--ortho-weight", self.ortho_weight)):
            if _check_number(flag, v) < 0:
                raise ConfigError(f"{flag} {v!r} must be >= 0; e.g. {flag} 0")
        if _check_number("--clip", self.clip) <= 0:
            raise ConfigError(f"--clip {self.clip!r} must be > 0 (the gradient-norm limit); e.g. --clip 1.0")
        if _check_number("--init-scale", self.init_scale) == 0 and self.init == "residual":
            raise ConfigError("--init-scale 0 with --init residual is zero init; use --init zero")
        a = _check_number("--augment", self.augment)
        if not 0.0 <= a < 1.0:
            raise ConfigError(f"--augment {self.augment!r} is outside [0, 1); it is the share of tokens replaced "
                              "by random ones, e.g. 0.15 (0 = off)")
        f = _check_number("--eval-fraction", self.eval_fraction)
        if not 0.0 < f < 1.0:
            raise ConfigError(f"--eval-fraction {self.eval_fraction!r} is outside (0, 1); it is the share of "
                              "--data held out for evaluation, e.g. 0.1")
        for flag, v, allowed in (("--train", self.train, TRAIN_MODES), ("--init", self.init, LORA_INITS),
                                 ("--fold", self.fold, FOLDS)):
            if v not in allowed:
                raise ConfigError(f"{flag} {v!r} is not one of {', '.join(allowed)}; pick one of them")
        loss = tuple(self.loss)
        bad = [t for t in loss if t not in LOSS_TERMS]
        if bad or len(set(loss)) != len(loss):
            raise ConfigError(f"--loss {','.join(loss)!r} must be distinct terms among {', '.join(LOSS_TERMS)}; "
                              "e.g. --loss hidden,pooled")
        object.__setattr__(self, "loss", loss)
        sched = tuple(tuple(p) for p in self.rank_schedule)
        prev_step, prev_rank = 0, self.lora_rank
        for pair in sched:
            if (len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair)
                    or pair[0] <= prev_step or pair[1] <= prev_rank):
                raise ConfigError(f"--rank-schedule {pair!r}: entries are STEP:RANK with increasing steps >= 1 "
                                  f"and ranks above the previous rank ({prev_rank}); e.g. 200:16,500:32")
            prev_step, prev_rank = pair
        if sched and self.train == "factors":
            raise ConfigError("--rank-schedule grows LoRA adapters, but --train factors uses none; "
                              "add --train both (or lora)")
        object.__setattr__(self, "rank_schedule", sched)

    @property
    def uses_lora(self) -> bool:
        return self.train in ("lora", "both")

    @property
    def warmup_steps(self) -> int:
        return min(self.warmup if self.warmup is not None else max(self.steps // 20, 1), self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["loss"] = list(self.loss)
        d["rank_schedule"] = [list(p) for p in self.rank_schedule]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecoveryConfig":
        _check_keys(cls, d, "recovery")
        d = dict(d)
        d["loss"] = tuple(d.get("loss", ()))
        d["rank_schedule"] = tuple(tuple(p) for p in d.get("rank_schedule", ()))
        return cls(**d)
