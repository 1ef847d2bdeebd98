"""CompressConfig: what to compress and how much, a frozen dataclass validated on construction
that round-trips via dict/JSON. Method configs live with their methods (``methods/``) and
RecoveryConfig in ``recovery/config.py``; both are re-exported here for old import paths."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .checks import _check_keys, _check_number, check_seed  # noqa: F401  (check_seed re-exported)
from .errors import ConfigError
from .methods import registry
from .methods.auto import AutoConfig  # noqa: F401  (re-exported)
from .methods.cp import CPConfig  # noqa: F401  (re-exported)
from .methods.shared_svd import SharedBasisConfig  # noqa: F401  (re-exported)
from .methods.svd import SOLVERS, SVDConfig  # noqa: F401  (re-exported)
from .methods.svd_whiten import WhitenedSVDConfig
from .methods.tt import TTConfig  # noqa: F401  (re-exported)
from .methods.tucker import TuckerConfig  # noqa: F401  (re-exported)
from .recovery.config import FOLDS, LORA_INITS, LOSS_TERMS, TRAIN_MODES, RecoveryConfig  # noqa: F401  (re-exported)

ALLOCATIONS = ("uniform", "global")
CALIBRATIONS = ("auto", "open", "closed")
SCOPES = ("targets", "model")


def __getattr__(name: str) -> Any:
    """``METHODS``: the registered method names, read from the registry when asked (old import path)."""
    if name == "METHODS":
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


QUANT_ALGORITHMS = ("gptq", "rtn")


def method_config(name: str, **kwargs: Any) -> SVDConfig:
    """Build the method config for a --method name (any registered method)."""
    return registry.method_config(name, **kwargs)


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

    ``calibration="closed"`` compresses block by block (the ``blocks`` module list, found when
    None) and fits each layer to the original outputs from the inputs the compressed model
    gives it (``closed_blend``: weight of the open-loop error in that fit; ``closed_ridge``:
    ridge relative to the mean input energy). ``"auto"`` (default) is closed where it applies
    (calibration data given as text or tensors, ``svd-whiten``, a block list found, no latency
    budget) and open elsewhere; ``"open"`` fits every layer to the original model's inputs.
    """

    method: SVDConfig = field(default_factory=WhitenedSVDConfig)
    rank: int | tuple[int, int] | None = field(default=None, metadata={"example": "32"})
    ratio: float | None = None
    energy: float | None = field(default=None, metadata={"example": "0.95"})
    allocate: str = "global"
    scope: str = "targets"
    targets: tuple[str, ...] = field(default=(), metadata={"example": "['encoder.*']"})
    exclude: tuple[str, ...] = field(default=(), metadata={"example": "['pooler.dense']"})
    seed: int = 0
    probe_passes: int = 2
    latency: float | None = field(default=None, metadata={"example": "0.6"})
    latency_threads: int = 1
    latency_batch: int = 1
    latency_seq: int = 128
    latency_int8: bool = False
    calibration: str = "auto"
    closed_blend: float = 0.75
    closed_ridge: float = 1e-4
    blocks: str | None = field(default=None, metadata={"example": "'model.layers'"})
    bytes: float | None = field(default=None, metadata={"example": "0.15"})
    block_size: int = 128
    symmetric: bool = True
    quant_algorithm: str = "gptq"

    def _check_quant(self) -> None:
        """``bytes`` (fraction of the float32 bytes), ``block_size``, ``symmetric``, ``quant_algorithm``."""
        if self.quant_algorithm not in QUANT_ALGORITHMS:
            raise ConfigError(f"--quantize-algorithm {self.quant_algorithm!r} is not one of {', '.join(QUANT_ALGORITHMS)}; "
                              "use gptq (data-aware, default) or rtn (round to nearest)")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ConfigError(f"--block-size {b!r} is not a power of two >= 16 (the runtime's MatMulNBits rule); "
                              "use 16, 32, 64 or 128")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric={self.symmetric!r} must be true or false")
        if self.bytes is None:
            return
        f = _check_number("--budget bytes", self.bytes)
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"--budget bytes={self.bytes!r} is outside (0, 1]; it is the fraction of the model's "
                              "float32 bytes to ship, e.g. --budget bytes=0.15")
        if not registry.for_config(self.method).whitened:
            raise ConfigError(f"--budget bytes weighs choices on calibration outputs and needs --method svd-whiten "
                              f"(got {self.method.name}); drop --method or use svd-whiten")
        if self.calibration == "closed":
            raise ConfigError("--calibration closed works with --ratio, --rank or --energy, not --budget bytes; "
                              "use --calibration open (or leave it out)")

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "ratio", "energy", "latency", "bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"budget options given: {given or 'none'}; exactly one of --rank, --ratio, --energy, "
                "--budget latency=F or --budget bytes=F is needed, e.g. --ratio 0.5"
            )
        self._check_quant()
        if self.latency is not None:
            lat = _check_number("--budget latency", self.latency)
            if not 0.0 < lat <= 1.0:
                raise ConfigError(f"--budget latency={self.latency!r} is outside (0, 1]; it is the fraction of the "
                                  "original's measured latency to reach, e.g. --budget latency=0.6")
            if isinstance(self.method, SVDConfig) and not registry.for_config(self.method).latency_budget:
                able = " or ".join(m.name for m in registry.methods() if m.latency_budget)
                raise ConfigError(f"--budget latency works with --method {able} (got {self.method.name}); "
                                  "use --ratio for other methods")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"--calibration {self.calibration!r} is not one of {CALIBRATIONS}; e.g. --calibration closed")
        blend = _check_number("--closed-blend", self.closed_blend)
        if not 0.0 <= blend <= 1.0:
            raise ConfigError(f"--closed-blend {self.closed_blend!r} is outside [0, 1]; it weighs the open-loop "
                              "error in the closed-loop objective, e.g. --closed-blend 0.25")
        ridge = _check_number("--closed-ridge", self.closed_ridge)
        if not 0.0 <= ridge <= 1.0:
            raise ConfigError(f"--closed-ridge {self.closed_ridge!r} is outside [0, 1]; it is relative to the mean "
                              "input energy, e.g. --closed-ridge 1e-4")
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks.strip()):
            raise ConfigError(f"--blocks {self.blocks!r} must be a module-list name or pattern, e.g. --blocks model.layers")
        if self.calibration == "closed" and self.latency is not None:  # auto: open under a latency budget
            raise ConfigError("--calibration closed works with --ratio, --rank or --energy, not --budget latency "
                              "(latency is measured on the whole model); use --calibration open")
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
            if isinstance(self.method, SVDConfig) and not registry.for_config(self.method).rank_pair:
                able = " or ".join(m.name for m in registry.methods() if m.rank_pair)
                raise ConfigError(f"--rank {pair[0]},{pair[1]} (a pair) is only for --method {able}; give one "
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
        default = WhitenedSVDConfig.name
        m = dict(d.pop("method", {"name": default}))
        name = m.pop("name", default)
        d["targets"] = tuple(d.get("targets", ()))
        d["exclude"] = tuple(d.get("exclude", ()))
        if isinstance(d.get("rank"), list):
            d["rank"] = tuple(d["rank"])
        return cls(method=method_config(name, **m), **d)
