"""Recipes: one TOML file naming source, data, per-layer rules, recovery, export and gates.

``load_recipe`` parses and checks a file (one-line errors: TOML position, unknown keys with
the closest known one, wrong types); ``recipe_write.dump_recipe`` writes the canonical text, so
that ``load_recipe(dump_recipe(r)) == r`` and dumping again gives the same bytes. Relative paths
in a recipe are relative to the recipe's folder.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..config import CompressConfig, RecoveryConfig, method_config
from ..edge.validate import check_gates
from ..errors import ConfigError
from ..methods import registry
from .schema import Spec, spec_of

GATES = ("max_cosine_drift", "max_abs_error", "min_top1_agreement", "max_latency_ratio", "max_size_ratio",
         "max_ppl_ratio")
BUDGETS = ("rank", "ratio", "energy", "latency", "bytes")


@dataclass(frozen=True)
class Rule:
    """Layers matching ``match`` (exact name, glob or ``re:`` regex; first rule wins) get
    ``method`` at their own budget (``ratio`` of their params, ``rank`` or ``energy``), or
    stay dense with ``dense = true``."""

    match: str = field(metadata={"example": "'*.intermediate.dense'"})
    method: str | None = field(default=None, metadata={"example": repr(registry.DEFAULT)})
    rank: int | None = field(default=None, metadata={"example": "32"})
    ratio: float | None = None
    energy: float | None = field(default=None, metadata={"example": "0.95"})
    dense: bool = field(default=False, metadata={"example": "true"})


@dataclass(frozen=True)
class DataSection:
    """Calibration (``calib``), held-out evaluation (``eval``, for validation) and tokenisation."""

    calib: str | None = field(default=None, metadata={"example": "'calib.txt'"})
    eval: str | None = field(default=None, metadata={"example": "'eval.txt'"})
    max_length: int = 128
    calib_samples: int | None = field(default=None, metadata={"example": "256"})
    eval_samples: int | None = field(default=None, metadata={"example": "500"})
    batch_size: int = 32


@dataclass(frozen=True)
class CompressSection:
    """Every ``CompressConfig`` field (the method and budget of the target layers no
    rule claims) and the method's options (``solver``, ``embedding_smoothing``, ``share_group``,
    ...) in one table, the ``device``, and the ``[[compress.rules]]``. The table's keys and types
    are generated from CompressConfig and the method configs (``schema.spec_of``)."""

    config: Any  # CompressConfig
    rules: tuple[Rule, ...] = ()
    device: str = "cpu"

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def targets(self) -> tuple[str, ...]:
        return self.config.targets

    @property
    def exclude(self) -> tuple[str, ...]:
        return self.config.exclude

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass(frozen=True)
class RecoverySection:
    """Recovery after compression: ``data`` (training text, default: the calibration data),
    ``eval_data`` (early-stopping split, default: a share of ``data``), and every
    RecoveryConfig field (``steps``, ``lr``, ``train``, ...)."""

    config: RecoveryConfig
    data: str | None = None
    eval_data: str | None = None


@dataclass(frozen=True)
class ExportSection:
    """Edge artifacts: ``to`` (onnx, ort, coreml), ``quantize`` ("none" | "int8"),
    ``precision`` for Core ML ("fp16" | "fp32"), ``fp16`` ONNX weights, ``opset``."""

    to: tuple[str, ...] = ("onnx",)
    quantize: str = "none"
    precision: str = "fp16"
    fp16: bool = False
    opset: int = 18


@dataclass(frozen=True)
class ValidateSection:
    """Validation of one artifact against the original on ``[data] eval``: ``artifact``
    ("ort", "onnx", "coreml" or "model" = the compressed folder in torch), runtime settings and gates."""

    artifact: str = "onnx"
    threads: int = 1
    batch_size: int = 1
    runs: int = 50
    max_cosine_drift: float | None = field(default=None, metadata={"example": "0.05"})
    max_abs_error: float | None = field(default=None, metadata={"example": "0.05"})
    min_top1_agreement: float | None = field(default=None, metadata={"example": "0.95"})
    max_latency_ratio: float | None = field(default=None, metadata={"example": "1.0"})
    max_size_ratio: float | None = field(default=None, metadata={"example": "0.5"})
    max_ppl_ratio: float | None = field(default=None, metadata={"example": "1.1"})  # causal LMs: perplexity ratio

    @property
    def gates(self) -> dict[str, float]:
        return {g: getattr(self, g) for g in GATES if getattr(self, g) is not None}


@dataclass(frozen=True)
class Recipe:
    """A whole run. ``base`` is the folder relative paths are resolved against."""

    source: str
    weights: str | None = None
    data: DataSection = field(default_factory=DataSection)
    compress: CompressSection | None = None
    recovery: RecoverySection | None = None
    export: ExportSection | None = None
    validate: ValidateSection | None = None
    base: str = field(default=".", compare=False)

    def path(self, p: str | None) -> str | None:
        """A recipe path (relative to the recipe's folder) made usable from the current directory."""
        if p is None or os.path.isabs(p):
            return p
        full = os.path.abspath(os.path.join(self.base, p))
        cwd = os.getcwd()  # spelled as a CLI user would (relative below the current folder): same manifests
        return os.path.relpath(full, cwd) if full.startswith(cwd + os.sep) else full

    def source_path(self) -> str:
        """The source as the CLI takes it: ``minilm``, zoo names and ``package.module:factory``
        stay as written; folders and ``file.py:factory`` are resolved like other paths."""
        s = self.source
        if s == "minilm" or s.startswith(("torchvision:", "timm:")):
            return s
        if ":" in s and not os.path.exists(self.path(s) or s):
            file, _, fn = s.rpartition(":")
            return f"{self.path(file)}:{fn}" if file.endswith(".py") else s
        return self.path(s) or s

    def resolved(self) -> "Recipe":
        """The same recipe with every path usable from the current directory (base ".")."""
        rec = self.recovery
        if rec is not None:
            rec = replace(rec, data=self.path(rec.data), eval_data=self.path(rec.eval_data))
        return replace(self, source=self.source_path(), weights=self.path(self.weights), recovery=rec, base=".",
                       data=replace(self.data, calib=self.path(self.data.calib), eval=self.path(self.data.eval)))


# ---------------------------------------------------------------- parsing

def _closest(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"did you mean {near[0]!r}?" if near else f"allowed: {', '.join(sorted(known))}"


def _check_table(where: str, table: Any, known: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"recipe {where} must be a table, got {type(table).__name__} {table!r}; write [{where}]")
    for k in table:
        if k not in known:
            raise ConfigError(f"recipe {where}: unknown key {k!r}; {_closest(k, known)}")
    return table


_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def _typed(where: str, key: str, value: Any, kind: type, example: str) -> Any:
    ok = (isinstance(value, kind) and not isinstance(value, bool)) if kind in (int, float) else isinstance(value, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise ConfigError(f"recipe {where}.{key} = {value!r} must be {_TYPES[kind]}; e.g. {key} = {example}")
    return value


def _fields_of(table: dict[str, Any], where: str, spec: dict[str, tuple[type, str]]) -> dict[str, Any]:
    out = {}
    for k, v in table.items():
        if k in spec:
            kind, example = spec[k]
            out[k] = _typed(where, k, v, kind, example)
            if kind is list:
                out[k] = tuple(out[k])
    return out


def _method_option_names(method: str) -> list[str]:
    cls = registry.configs().get(method)
    return [f.name for f in fields(cls) if f.init] if cls is not None else []


def _compress_spec() -> Spec:
    return {"method": (str, repr(registry.DEFAULT)), **spec_of(CompressConfig, skip=("method", "rank")),
            "device": (str, "'cpu'")}


_RULE = spec_of(Rule)
_DATA = spec_of(DataSection)
_EXPORT = spec_of(ExportSection)
_VALIDATE = spec_of(ValidateSection)


def _rule(i: int, t: Any) -> Rule:
    where = f"[[compress.rules]] #{i + 1}"
    _check_table(where, t, list(_RULE))
    d = _fields_of(t, where, _RULE)
    if "match" not in d:
        raise ConfigError(f"recipe {where} has no 'match'; give a layer name, glob or re:REGEX, e.g. match = "
                          "'*.attention.*'")
    budgets = [b for b in ("rank", "ratio", "energy") if b in d]
    if d.get("dense") and (budgets or "method" in d):
        raise ConfigError(f"recipe {where} (match {d['match']!r}): dense = true contradicts "
                          f"{', '.join(budgets + ['method'] * ('method' in d))}; keep one of them")
    if not d.get("dense") and len(budgets) != 1:
        raise ConfigError(f"recipe {where} (match {d['match']!r}) has budgets {budgets or 'none'}: give exactly one "
                          "of rank, ratio, energy (or dense = true)")
    if "method" in d and d["method"] not in registry.names():
        raise ConfigError(f"recipe {where} (match {d['match']!r}): method {d['method']!r} is not one of "
                          f"{', '.join(registry.names())}; pick one of them")
    return Rule(**d)


def parse_recipe(doc: dict[str, Any], base: str = ".") -> Recipe:
    """Check a parsed TOML document and build the Recipe."""
    top = ["source", "weights", "data", "compress", "recovery", "export", "validate"]
    _check_table("(top level)", doc, top)
    if "source" not in doc:
        raise ConfigError("recipe has no 'source'; add e.g. source = 'minilm' at the top")
    source = _typed("(top level)", "source", doc["source"], str, "'minilm'")
    weights = _typed("(top level)", "weights", doc["weights"], str, "'weights.safetensors'") if "weights" in doc else None
    data = DataSection(**_fields_of(_check_table("[data]", doc.get("data", {}), list(_DATA)), "[data]", _DATA))
    for k in ("max_length", "batch_size", "calib_samples", "eval_samples"):
        v = getattr(data, k)
        if v is not None and v < 1:
            raise ConfigError(f"recipe [data].{k} = {v} must be >= 1; e.g. {k} = {_DATA[k][1]}")
    comp = None
    if "compress" in doc:
        c = doc["compress"]
        method = c.get("method", registry.DEFAULT) if isinstance(c, dict) else registry.DEFAULT
        opt_names = [k for k in _method_option_names(method) if k != "name"] if isinstance(method, str) else []
        spec = _compress_spec()
        _check_table("[compress]", c, list(spec) + ["rank", "rules"] + opt_names)
        d = _fields_of(c, "[compress]", spec)
        if "rank" in c:
            r = c["rank"]
            if isinstance(r, list):
                d["rank"] = [_typed("[compress]", "rank", x, int, "32") for x in r]
            else:
                d["rank"] = _typed("[compress]", "rank", r, int, "32")
        given = [b for b in BUDGETS if b in d]
        if len(given) > 1:
            raise ConfigError(f"recipe [compress] has contradictory budgets {given}; keep exactly one of "
                              f"{', '.join(BUDGETS)}")
        rules = c.get("rules", [])
        if not isinstance(rules, list):
            raise ConfigError("recipe [compress].rules must be an array of tables; write [[compress.rules]]")
        rules = tuple(_rule(i, t) for i, t in enumerate(rules))
        if rules and "bytes" in d:
            raise ConfigError("recipe [compress] has a bytes budget and [[compress.rules]]: a bytes budget plans the "
                              "whole model at once and cannot share it with rules; drop the rules (use exclude) or "
                              "the bytes budget")
        opts = {k: (tuple(tuple(x) for x in v) if k == "tt_shape" else v) for k, v in c.items() if k in opt_names}
        method = d.pop("method", registry.DEFAULT)
        device = d.pop("device", "cpu")
        if isinstance(d.get("rank"), list):  # a Tucker pair, written as a TOML list
            d["rank"] = tuple(d["rank"])
        # values (method, ranges) are checked now, not after loading the model
        comp = CompressSection(CompressConfig(method=method_config(method, **opts), **d), rules, device)
        for rule in rules:  # each rule's method and budget, before the model is loaded
            if not rule.dense:
                to_config(comp, rule, (rule.match,))
    rec = None
    if "recovery" in doc:
        r = dict(_check_table("[recovery]", doc["recovery"], [f.name for f in fields(RecoveryConfig)]
                              + ["data", "eval_data"]))
        paths = {k: _typed("[recovery]", k, r.pop(k), str, "'train.txt'") for k in ("data", "eval_data") if k in r}
        try:
            cfg = RecoveryConfig.from_dict(r)
        except TypeError as e:
            raise ConfigError(f"recipe [recovery]: {e}; check the value types") from None
        rec = RecoverySection(cfg, **paths)
    exp = None
    if "export" in doc:
        e = _fields_of(_check_table("[export]", doc["export"], list(_EXPORT)), "[export]", _EXPORT)
        exp = ExportSection(**e)
        from exporters.registry import target_names, transform_names
        targets, quantize = target_names(), ["none", *transform_names()]
        bad = [t for t in exp.to if t not in targets]
        if bad or not exp.to:
            raise ConfigError(f"recipe [export].to = {list(exp.to)} has unknown targets {bad}; valid: "
                              f"{', '.join(targets)}")
        if exp.quantize not in quantize:
            raise ConfigError(f"recipe [export].quantize = {exp.quantize!r} must be one of {', '.join(map(repr, quantize))}")
        if exp.precision not in ("fp16", "fp32"):
            raise ConfigError(f"recipe [export].precision = {exp.precision!r} must be 'fp16' or 'fp32'")
    val = None
    if "validate" in doc:
        v = doc["validate"]
        _check_table("[validate]", v, list(_VALIDATE))
        val = ValidateSection(**_fields_of(v, "[validate]", _VALIDATE))
        for g, limit in val.gates.items():
            try:
                check_gates({g: limit})
            except ConfigError as e:
                raise ConfigError(f"recipe [validate].{g} = {limit!r}: {e}") from None
        if val.artifact not in ("onnx", "ort", "coreml", "model"):
            raise ConfigError(f"recipe [validate].artifact = {val.artifact!r} must be one of onnx, ort, coreml, model")
        for k in ("threads", "batch_size", "runs"):
            if getattr(val, k) < 1:
                raise ConfigError(f"recipe [validate].{k} = {getattr(val, k)} must be >= 1; e.g. {k} = 1")
        if val.artifact != "model" and (exp is None or (val.artifact == "onnx" and "onnx" not in exp.to
                                                        and "ort" not in exp.to) or
                                        (val.artifact not in ("onnx", "model") and val.artifact not in exp.to)):
            raise ConfigError(f"recipe [validate].artifact = {val.artifact!r} is not exported; add it to [export].to "
                              "or validate artifact = 'model'")
        if data.eval is None:
            raise ConfigError("recipe [validate] needs held-out data; set [data].eval = 'FILE'")
    return Recipe(source, weights, data, comp, rec, exp, val, base=base)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file."""
    import tomllib
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist or is not a file; give the path of a .toml recipe "
                          "(e.g. samples/minilm/recipe.toml)")
    if p.stat().st_size > 2**20:
        raise ConfigError(f"recipe {str(path)!r} is {p.stat().st_size:,} bytes, over the 1 MiB a recipe may have; "
                          "give the recipe's .toml file, not a data file")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text; save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {str(path)!r}: TOML syntax error: {e}; fix the file there") from None
    return parse_recipe(doc, base=str(p.parent))


def to_config(c: CompressSection, rule: Rule | None = None, targets: tuple[str, ...] | None = None) -> Any:
    """The CompressConfig for the default group (``rule=None``) or for one rule's layers: the
    section's config with the rule's method and budget, over ``targets`` only."""
    if rule is None and targets is None:
        return c.config
    m = c.config.method
    if rule is not None and rule.method and rule.method != m.name:
        given = {k: v for k, v in m.to_dict().items() if k != "name"}
        m = method_config(rule.method, **{k: given[k] for k in _method_option_names(rule.method) if k in given})
    owner: Any = rule if rule is not None else c.config  # a rule's budget counts its own layers (scope "targets")
    budget = {b: getattr(owner, b, None) for b in BUDGETS}
    return replace(c.config, method=m, scope="targets" if rule is not None else c.config.scope,
                   targets=c.config.targets if targets is None else targets,
                   exclude=c.config.exclude if targets is None else (), **budget)
