"""Compression configs: frozen dataclasses validated on construction, round-trip via dict/JSON
(RecoveryConfig lives in recovery_config.py and is re-exported here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .checks import _check_keys, _check_number, check_seed  # noqa: F401  (check_seed re-exported)
from .errors import ConfigError
from .recovery.config import FOLDS, LORA_INITS, LOSS_TERMS, TRAIN_MODES, RecoveryConfig  # noqa: F401  (re-exported)

METHODS = ("svd", "svd-whiten", "tucker", "cp", "tt", "shared-svd", "auto")
TENSOR_METHODS = ("tucker", "cp", "tt")
ALLOCATIONS = ("uniform", "global")
SCOPES = ("targets", "model")
SOLVERS = ("exact", "randomized")


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
