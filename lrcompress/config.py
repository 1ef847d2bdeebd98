"""Compression configs: frozen dataclasses validated on construction, round-trip via dict/JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

METHODS = ("svd", "svd-whiten", "tucker", "cp", "tt", "shared-svd", "auto")
TENSOR_METHODS = ("tucker", "cp", "tt")
ALLOCATIONS = ("uniform", "global")
SCOPES = ("targets", "model")
SOLVERS = ("exact", "randomized")


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; allowed: {sorted(known)}")


MAX_SEED = 2**32 - 1


def check_seed(name: str, value: Any) -> int:
    """A seed is an integer in [0, 2**32 - 1] (what every generator used here accepts)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} {value!r} is not an integer in [0, 2**32 - 1]; e.g. {name} 0")
    return value


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not a finite number; give e.g. {name}=0.5")
    return float(value)


@dataclass(frozen=True)
class SVDConfig:
    """Plain truncated SVD (Eckart-Young optimal in weight space).

    solver: "exact" (full SVD) or "randomized" (subspace iteration, for large matrices).
    """

    solver: str = "exact"
    oversample: int = 16
    power_iters: int = 4
    name: str = field(default="svd", init=False)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver={self.solver!r} is not one of {SOLVERS}; pick one of them")
        if not isinstance(self.oversample, int) or self.oversample < 0:
            raise ConfigError(f"oversample={self.oversample!r} must be an int >= 0; e.g. 16")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ConfigError(f"power_iters={self.power_iters!r} must be an int >= 0; e.g. 4")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WhitenedSVDConfig(SVDConfig):
    """Data-aware SVD: minimises the layer's output error on calibration data.

    embedding_smoothing: share of the token-frequency weight spread uniformly over the
    vocabulary, so tokens unseen in calibration keep some fidelity (0 = pure frequency).
    """

    embedding_smoothing: float = 0.1
    name: str = field(default="svd-whiten", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        s = _check_number("embedding_smoothing", self.embedding_smoothing)
        if not 0.0 <= s <= 1.0:
            raise ConfigError(f"embedding_smoothing={s} must be in [0, 1]; e.g. 0.1")


@dataclass(frozen=True)
class TuckerConfig(WhitenedSVDConfig):
    """Tucker-2 for kxk Conv2d (data-aware on the input-channel mode when calibrated); other
    selected layers use whitened SVD. ``max_iter``: HOOI sweeps."""

    max_iter: int = 50
    name: str = field(default="tucker", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ConfigError(f"max_iter={self.max_iter!r} must be an int >= 0; e.g. 50")


@dataclass(frozen=True)
class CPConfig(WhitenedSVDConfig):
    """CP for kxk Conv2d by ALS from HOSVD factors; a layer whose fit stays below ``min_fit``
    is kept dense (and the report says so). Other selected layers use whitened SVD."""

    max_iter: int = 100
    tol: float = 1e-6
    min_fit: float = 0.8
    name: str = field(default="cp", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter!r} must be an int >= 1; e.g. 100")
        if not 0.0 <= _check_number("min_fit", self.min_fit) < 1.0:
            raise ConfigError(f"min_fit={self.min_fit} must be in [0, 1); e.g. 0.8")
        if not _check_number("tol", self.tol) > 0:
            raise ConfigError(f"tol={self.tol} must be > 0; e.g. 1e-6")


@dataclass(frozen=True)
class TTConfig(WhitenedSVDConfig):
    """Tensor-train matrices for Linear layers; in/out features factor into ``modes`` balanced
    integer modes, or the explicit ``tt_shape`` ((out modes), (in modes)) for every layer."""

    modes: int = 3
    tt_shape: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    name: str = field(default="tt", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.modes, bool) or not isinstance(self.modes, int) or not 2 <= self.modes <= 6:
            raise ConfigError(f"modes={self.modes!r} must be an int in [2, 6]; e.g. 3")
        if self.tt_shape is not None:
            shape = tuple(tuple(int(v) for v in part) for part in self.tt_shape)
            if len(shape) != 2 or len(shape[0]) != len(shape[1]) or len(shape[0]) < 2 or min(min(shape[0]), min(shape[1])) < 1:
                raise ConfigError(f"--tt-shape {self.tt_shape!r} must be two equally long lists of >= 2 "
                                  "positive modes, e.g. 8x6x8:8x6x8 (out:in)")
            object.__setattr__(self, "tt_shape", shape)


@dataclass(frozen=True)
class SharedBasisConfig(WhitenedSVDConfig):
    """Cross-layer shared bases: Linear layers of the same role in ``share_group`` consecutive
    blocks share one whitened output basis; each keeps its own coefficients."""

    share_group: int = 2
    name: str = field(default="shared-svd", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.share_group, bool) or not isinstance(self.share_group, int) or self.share_group < 2:
            raise ConfigError(f"--share-group {self.share_group!r} must be an integer >= 2; e.g. --share-group 2")


@dataclass(frozen=True)
class AutoConfig(WhitenedSVDConfig):
    """Per layer, the method with the lowest predicted output error at the layer's share of a
    ``ratio`` budget: Tucker-2 vs CP for kxk convs, whitened SVD vs tensor-train for Linear
    (TT only when ``try_tt``), whitened SVD for the rest. Sub-methods use their defaults."""

    try_tt: bool = True
    name: str = field(default="auto", init=False)


MethodConfig = SVDConfig
_CONFIGS = {"svd": SVDConfig, "svd-whiten": WhitenedSVDConfig, "tucker": TuckerConfig, "cp": CPConfig,
            "tt": TTConfig, "shared-svd": SharedBasisConfig, "auto": AutoConfig}


def method_config(name: str, **kwargs: Any) -> SVDConfig:
    """Build the method config for a --method name."""
    if name not in _CONFIGS:
        raise ConfigError(f"--method {name!r} is not one of {', '.join(METHODS)}; pick one of them")
    if name == "svd":
        kwargs.pop("embedding_smoothing", None)
    known = {f.name for f in fields(_CONFIGS[name]) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"options {unknown} do not apply to --method {name}; allowed: {sorted(known)}")
    return _CONFIGS[name](**kwargs)


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how much.

    ``allocate="global"`` spends a ``ratio`` budget where the truncation loss per parameter is
    highest, each layer's loss weighted by its measured effect on the model output
    (``probe_passes`` rounds of probes on a few calibration examples; 0 = unweighted).

    Exactly one budget: ``rank`` (int, every target), ``ratio`` (fraction of parameters to
    keep, of the targeted layers or of the whole model per ``scope``), ``energy``
    (fraction of the (whitened) spectral energy to keep per layer) or ``latency`` (fraction
    of the original's latency on ONNX Runtime CPU with ``latency_threads`` threads on
    ``latency_batch`` x ``latency_seq`` inputs; layers not faster factorized stay dense;
    ``latency_int8``: costs measured on the int8-quantized model, as it will be exported).
    """

    method: SVDConfig = field(default_factory=WhitenedSVDConfig)
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    allocate: str = "global"
    scope: str = "targets"
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    probe_passes: int = 2
    latency: float | None = None
    latency_threads: int = 1
    latency_batch: int = 1
    latency_seq: int = 128
    latency_int8: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "ratio", "energy", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"budget options given: {given or 'none'}; exactly one of --rank, --ratio, --energy or "
                "--budget latency=F is needed, e.g. --ratio 0.5"
            )
        if self.latency is not None:
            lat = _check_number("--budget latency", self.latency)
            if not 0.0 < lat <= 1.0:
                raise ConfigError(f"--budget latency={self.latency!r} is outside (0, 1]; it is the fraction of the "
                                  "original's measured latency to reach, e.g. --budget latency=0.6")
            if self.method.name not in ("svd", "svd-whiten"):
                raise ConfigError(f"--budget latency works with --method svd-whiten or svd (got {self.method.name}); "
                                  "use --ratio for other methods")
        if not isinstance(self.latency_int8, bool):
            raise ConfigError(f"latency_int8={self.latency_int8!r} must be true or false")
        check_seed("--seed", self.seed)
        for k, v in (("latency_threads", self.latency_threads), ("latency_batch", self.latency_batch),
                     ("latency_seq", self.latency_seq)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k}={v!r} must be an integer >= 1; e.g. {k}=1")
        if isinstance(self.rank, (tuple, list)):
            pair = tuple(self.rank)
            if (len(pair) != 2 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in pair)):
                raise ConfigError(f"--rank {self.rank!r} must be an integer >= 1 or, for tucker, a pair "
                                  "R_OUT,R_IN of integers >= 1; e.g. --rank 32,16")
            if self.method.name != "tucker":
                raise ConfigError(f"--rank {pair[0]},{pair[1]} (a pair) is only for --method tucker; give one "
                                  "integer, e.g. --rank 32")
            object.__setattr__(self, "rank", pair)
        elif self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ConfigError(f"--rank {self.rank!r} must be an integer >= 1; e.g. --rank 64")
        if self.ratio is not None:
            r = _check_number("--ratio", self.ratio)
            if not 0.0 < r <= 1.0:
                raise ConfigError(
                    f"--ratio {self.ratio!r} is outside (0, 1]; it is the fraction of parameters "
                    "to keep, e.g. --ratio 0.5"
                )
        if self.energy is not None:
            e = _check_number("--energy", self.energy)
            if not 0.0 < e <= 1.0:
                raise ConfigError(
                    f"--energy {self.energy!r} is outside (0, 1]; it is the fraction of spectral "
                    "energy to keep, e.g. --energy 0.95"
                )
        if isinstance(self.probe_passes, bool) or not isinstance(self.probe_passes, int) or not 0 <= self.probe_passes <= 5:
            raise ConfigError(f"--probe-passes {self.probe_passes!r} must be an integer in [0, 5]; 0 turns the "
                              "measured sensitivities off, 2 is the default")
        if self.allocate not in ALLOCATIONS:
            raise ConfigError(f"--allocate {self.allocate!r} is not one of {ALLOCATIONS}")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope {self.scope!r} is not one of {SCOPES}")
        if not isinstance(self.method, SVDConfig):
            raise ConfigError(f"method={self.method!r} is not a method config; use method_config()")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def matrix_rank(self) -> int | None:
        """The rank for two-factor (matrix) layers: ``rank``, or the smaller of a Tucker pair."""
        return min(self.rank) if isinstance(self.rank, tuple) else self.rank

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.rank, tuple):
            d["rank"] = list(self.rank)
        d["method"] = self.method.to_dict()
        d["targets"] = list(self.targets)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressConfig":
        _check_keys(cls, d, "config")
        d = dict(d)
        m = dict(d.pop("method", {"name": "svd-whiten"}))
        name = m.pop("name", "svd-whiten")
        d["targets"] = tuple(d.get("targets", ()))
        d["exclude"] = tuple(d.get("exclude", ()))
        if isinstance(d.get("rank"), list):
            d["rank"] = tuple(d["rank"])
        return cls(method=method_config(name, **m), **d)


TRAIN_MODES = ("factors", "lora", "both", "all")
LORA_INITS = ("residual", "zero")
FOLDS = ("budget", "exact")
LOSS_TERMS = ("hidden", "pooled", "kl")


def _check_int(name: str, value: Any, low: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} {value!r} must be an integer >= {low}; e.g. {name} {example}")


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
