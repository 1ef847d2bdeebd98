"""Hostile input to the methods (issue 11): layers a model-wide method cannot take stay dense
with the reason instead of failing the run; NaN/Inf weights are named before calibration runs;
NaN/Inf candidate outputs fail validation instead of passing it.

The factories below are importable CLI sources (``tests.test_hostile_methods:odd_mlp``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lrcompress as lc
from lrcompress.cli import main
from lrcompress.errors import ConfigError, DataError, WeightError
from lrcompress.methods.tt_layers import TTLinear

HERE = "tests.test_hostile_methods"


# --------------------------------------------------------------------------------------------
# factories (CLI sources) and helpers


class MLP(nn.Module):
    """Three Linear layers fc1 -> fc2 -> fc3 with ReLU in between."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        a, b, c, d = widths
        self.fc1 = nn.Linear(a, b)
        self.fc2 = nn.Linear(b, c)
        self.fc3 = nn.Linear(c, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def odd_mlp() -> nn.Module:
    """A 10-output head: 10 does not split into 3 balanced modes, but into 2 (2 x 5)."""
    torch.manual_seed(0)
    return MLP((64, 256, 256, 10))


def prime_mlp() -> nn.Module:
    """Prime widths 7 and 13: no tensor-train fits fc2 (7 x 256) or fc3 (13 x 7)."""
    torch.manual_seed(0)
    return MLP((64, 256, 7, 13))


def nan_mlp() -> nn.Module:
    """NaN in the first layer's weight: the error must name fc1.weight, not a later layer."""
    model = MLP((16, 32, 32, 8))
    torch.manual_seed(0)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    return model


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(self.bn(self.fc1(x)))))


class ConvNet(nn.Module):
    """A depthwise 5x5 conv (400 params, more than the 1x1 conv's share of the budget) next to
    convs Tucker/CP can take and a 1x1 conv (matrix method)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = torch.relu(self.pw(self.dw(h)))
        return self.c2(h).mean(dim=(2, 3))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def _data(n: int = 48, d: int = 64, seed: int = 1) -> lc.TensorData:
    g = np.random.default_rng(seed)
    return lc.TensorData({"": g.standard_normal((n, d)).astype(np.float32)})


def _tt(**kw: object) -> lc.CompressConfig:
    opts = {k: kw.pop(k) for k in ("modes", "tt_shape") if k in kw}
    return lc.CompressConfig(method=lc.method_config("tt", **opts), **kw)


def run_main(argv: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return (0 if exc.value.code is None else exc.value.code), out, err


def one_line_error(code: int, err: str, *contains: str) -> str:
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for c in contains:
        assert c in lines[0], lines[0]
    return lines[0]


def _npy(tmp_path: Path, arr: np.ndarray, name: str = "x.npy") -> Path:
    p = tmp_path / name
    np.save(p, arr)
    return p


# --------------------------------------------------------------------------------------------
# 1. a layer a model-wide method cannot take stays dense


def test_model_wide_tt_keeps_prime_layers_dense_with_the_reason():
    model = prime_mlp()
    for cfg in (_tt(ratio=0.5), _tt(rank=4)):
        small, rep = lc.compress(model, cfg, _data())
        by = {l.name: l for l in rep.layers}
        for name, why in (("fc2", "7 is prime"), ("fc3", "13 is prime")):
            assert type(small.get_submodule(name)) is nn.Linear
            assert by[name].rank is None and why in by[name].reason and "kept dense" in by[name].reason
            assert why in rep.table()
        plan = lc.plan(model, cfg, _data())
        reasons = {l.name: l.reason for l in plan.layers}
        assert "7 is prime" in reasons["fc2"] and "7 is prime" in plan.table()
    small, rep = lc.compress(model, _tt(rank=4), _data())
    assert isinstance(small.fc1, TTLinear)  # the layers tt can take are still factorized
    x = torch.from_numpy(_data().arrays["input"][:4])
    with torch.no_grad():
        assert small(x).shape == (4, 13)


def test_model_wide_tt_tries_fewer_modes_for_a_10_output_layer():
    small, rep = lc.compress(odd_mlp(), _tt(rank=2), _data())
    by = {l.name: l for l in rep.layers}
    assert isinstance(small.fc3, TTLinear)
    assert by["fc3"].choice.out_modes == (2, 5) and "2 TT modes" in by["fc3"].reason
    assert by["fc1"].choice.out_modes == (4, 8, 8) and "TT modes" not in by["fc1"].reason  # 3 modes where they fit


def test_model_wide_tt_at_a_ratio_never_aborts_on_odd_layers():
    for factory in (odd_mlp, prime_mlp):
        small, rep = lc.compress(factory(), _tt(ratio=0.5), _data())
        assert all(l.rank is None or l.method == "tt" for l in rep.layers)
        assert all(l.reason for l in rep.layers if l.rank is None)


@pytest.mark.parametrize("factory", ["odd_mlp", "prime_mlp"])
def test_cli_model_wide_tt_succeeds(factory, tmp_path, capsys):
    code, out, err = run_main(["compress", f"{HERE}:{factory}", "--method", "tt", "--ratio", "0.5", "-o",
                               tmp_path / "out", "--json", "-q"], capsys)
    assert code == 0, err
    layers = {l["name"]: l for l in json.loads(out)["layers"]}
    if factory == "prime_mlp":
        assert layers["fc2"]["rank"] is None and "prime" in layers["fc2"]["reason"]
    assert (tmp_path / "out").is_dir()


def test_cli_model_wide_tt_dry_run_shows_the_reason(capsys):
    code, out, err = run_main(["compress", f"{HERE}:prime_mlp", "--method", "tt", "--rank", "4", "--dry-run"], capsys)
    assert code == 0, err
    assert "13 is prime" in out


def test_exact_target_tt_cannot_take_is_an_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'fc3'") as exc:
        lc.compress(prime_mlp(), _tt(rank=4, targets=("fc3",)), _data())
    assert "--targets" in str(exc.value) and "prime" in str(exc.value)
    code, _, err = run_main(["compress", f"{HERE}:prime_mlp", "--method", "tt", "--ratio", "0.5", "--targets",
                             "fc3", "-o", tmp_path / "out"], capsys)
    one_line_error(code, err, "'fc3'", "--targets", "prime")
    assert not (tmp_path / "out").exists()
    # a glob or regex that happens to select it keeps it dense instead
    for pattern in ("fc*", "re:fc[23]"):
        _, rep = lc.compress(prime_mlp(), _tt(rank=4, targets=(pattern,)), _data())
        assert {l.name: l.rank for l in rep.layers}["fc3"] is None


def test_exact_target_gets_the_configured_modes_and_a_tt_shape_hint(tmp_path, capsys):
    # model-wide, the 10-output head falls back to 2 modes; named exactly, 3 modes are required
    with pytest.raises(ConfigError, match=r"'fc3'.*10 = 2 x 5.*--tt-shape 2x5:16x16 \(2 modes\) would fit"):
        lc.compress(odd_mlp(), _tt(rank=2, targets=("fc3",)), _data())
    code, _, err = run_main(["compress", f"{HERE}:odd_mlp", "--method", "tt", "--ratio", "0.5", "--targets", "fc3",
                             "-o", tmp_path / "out"], capsys)
    one_line_error(code, err, "'fc3'", "10x256", "--tt-shape 2x5:16x16")
    small, _ = lc.compress(odd_mlp(), _tt(rank=2, targets=("fc3",), tt_shape=((2, 5), (16, 16))), _data())
    assert isinstance(small.fc3, TTLinear)  # the hint works


def test_tt_shape_keeps_layers_of_other_shapes_dense():
    cfg = _tt(rank=4, tt_shape=((4, 8, 8), (4, 4, 4)))  # fc1 only: 256 x 64
    small, rep = lc.compress(prime_mlp(), cfg, _data())
    by = {l.name: l for l in rep.layers}
    assert isinstance(small.fc1, TTLinear)
    assert type(small.fc2) is nn.Linear and "--tt-shape 4x8x8:4x4x4" in by["fc2"].reason
    with pytest.raises(ConfigError, match="--tt-shape 2x2:2x2 fits no targeted Linear layer"):
        lc.compress(prime_mlp(), _tt(rank=4, tt_shape=((2, 2), (2, 2))), _data())


def test_tt_energy_is_refused_even_when_every_layer_is_dense():
    with pytest.raises(ConfigError, match="--energy"):
        lc.plan(lc.resolve(f"{HERE}:prime_mlp").model, _tt(energy=0.9, targets=("fc2", "fc3")), None)


@pytest.mark.parametrize("method", ["tucker", "cp"])
@pytest.mark.parametrize("allocate", ["global", "uniform"])
def test_model_wide_conv_methods_with_a_depthwise_conv(method, allocate):
    data = lc.TensorData({"": np.random.default_rng(0).standard_normal((24, 3, 10, 10)).astype(np.float32)})
    cfg = lc.CompressConfig(method=lc.method_config(method), ratio=0.5, allocate=allocate)
    small, rep = lc.compress(conv_net(), cfg, data)  # the dense depthwise conv once starved the 1x1 conv
    by = {l.name: l for l in rep.layers}
    assert type(small.dw) is nn.Conv2d and by["dw"].rank is None and "groups=16" in by["dw"].reason
    assert by["pw"].rank is not None or "break-even" in by["pw"].reason  # planned, not starved


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_exact_target_conv_method_cannot_take_is_an_error(method, tmp_path, capsys):
    data = lc.TensorData({"": np.random.default_rng(0).standard_normal((8, 3, 10, 10)).astype(np.float32)})
    with pytest.raises(ConfigError, match="'dw'.*groups"):
        lc.compress(conv_net(), lc.CompressConfig(method=lc.method_config(method), rank=4, targets=("dw",)), data)
    code, _, err = run_main(["compress", f"{HERE}:conv_net", "--method", method, "--rank", "4", "--targets", "dw",
                             "-o", tmp_path / "out"], capsys)
    one_line_error(code, err, "'dw'", "--targets", "groups=16")


def test_auto_and_shared_svd_take_odd_layers_without_aborting():
    _, rep = lc.compress(prime_mlp(), lc.CompressConfig(method=lc.method_config("auto"), ratio=0.5), _data())
    by = {l.name: l for l in rep.layers}
    assert "auto: svd-whiten" in by["fc3"].reason and "no tensor-train split" in by["fc3"].reason
    stack = lc.resolve("tests.models:stack").model  # a 5-output head outside the repeated blocks
    data = lc.TensorData({"": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)})
    _, rep = lc.compress(stack, lc.CompressConfig(method=lc.method_config("shared-svd"), ratio=0.5), data)
    assert {l.name for l in rep.layers} >= {"head", "blocks.0.up"}


# --------------------------------------------------------------------------------------------
# 2. NaN/Inf weights are named before calibration runs


def _nan_calls() -> dict[str, object]:
    from lrcompress.workflow.pipeline import gather
    cfg = lc.CompressConfig(ratio=0.5)
    return {
        "compress": lambda m, d: lc.compress(m, cfg, d),
        "compress_": lambda m, d: lc.compress_(m, cfg, d),
        "plan": lambda m, d: lc.plan(m, cfg, d),
        "gather": lambda m, d: gather(m, cfg, d),
        "calibrate": lambda m, d: lc.calibrate(m, d.batches(8), ["fc1", "fc2", "fc3"]),
    }


@pytest.mark.parametrize("entry", sorted(_nan_calls()))
def test_nan_weight_named_before_calibration(entry):
    data = _data(d=16)
    with pytest.raises(WeightError) as exc:
        _nan_calls()[entry](nan_mlp(), data)
    msg = str(exc.value)
    assert "parameter 'fc1.weight'" in msg and "activations" not in msg


def test_nan_in_a_batchnorm_buffer_is_named_first_in_module_order():
    model = BNNet()
    with torch.no_grad():
        model.bn.running_var[3] = float("nan")
        model.fc2.weight[0, 0] = float("inf")  # later in module order
    with pytest.raises(WeightError, match=r"buffer 'bn\.running_var' contains NaN or Inf"):
        lc.compress(model, lc.CompressConfig(ratio=0.5), _data(d=16))
    with pytest.raises(WeightError, match="bn.running_var"):
        lc.plan(model, lc.CompressConfig(method=lc.SVDConfig(), ratio=0.5))  # no data: planning checks too


def test_cli_nan_weight_is_one_line_naming_the_first_parameter(tmp_path, capsys):
    calib = _npy(tmp_path, _data(d=16).arrays["input"])
    code, _, err = run_main(["compress", f"{HERE}:nan_mlp", "--ratio", "0.5", "--calib", calib, "-o",
                             tmp_path / "out"], capsys)
    one_line_error(code, err, "'fc1.weight'", "NaN")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 3. validation: NaN/Inf outputs fail, bad time budgets are refused up front


class Scaled(nn.Module):
    """The reference Linear, times a parameter (NaN makes every output NaN, input-dependent)."""

    def __init__(self, ref: nn.Linear, scale: float) -> None:
        super().__init__()
        self.lin = ref
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class SqrtHole(nn.Module):
    """The reference plus sqrt(x0) - sqrt(x0): exact where x0 >= 0, NaN where x0 < 0."""

    def __init__(self, ref: nn.Linear) -> None:
        super().__init__()
        self.lin = ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sqrt(x[:, :1])
        return self.lin(x) + (s - s)


def _reference() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 4)


def _export(model: nn.Module, path: Path) -> str:
    import exporters
    exporters.export_onnx(model.eval(), {"input": torch.randn(2, 8)}, path)
    return str(path)


def _vdata(n: int = 12) -> lc.TensorData:
    x = np.random.default_rng(3).standard_normal((n, 8)).astype(np.float32)
    return lc.TensorData({"": x})


def test_all_nan_candidate_fails_validation(tmp_path):
    from lrcompress.edge.validate import FINITE_GATE, validate
    ref = _reference()
    cand = _export(Scaled(ref, float("nan")), tmp_path / "nan.onnx")
    data = _vdata()
    rep = validate(cand, ref, "ref", data, runs=2, warmup=1, gates={"max_abs_error": 1.0, "max_cosine_drift": 0.5})
    out = rep.outputs["output"]
    assert out["non_finite"] == len(data) == rep.non_finite
    assert out["max_abs"] == float("inf") and np.isnan(out["cos_mean"])
    failed = {g["gate"]: g for g in rep.failed}
    assert failed[FINITE_GATE]["value"] == len(data) and failed[FINITE_GATE]["limit"] == 0
    assert "max_abs_error" in failed and "max_cosine_drift" in failed
    assert rep.to_dict()["passed"] is False
    table = rep.table()
    assert "NaN/Inf" in table and f"{len(data)} of {len(data)} examples" in table
    # no gate asked for: the finite check still fails the report
    rep = validate(cand, ref, "ref", data, runs=2, warmup=1)
    assert [g["gate"] for g in rep.failed] == [FINITE_GATE]


def test_partly_nan_candidate_counts_the_bad_examples(tmp_path):
    from lrcompress.edge.validate import validate
    ref = _reference()
    cand = _export(SqrtHole(ref), tmp_path / "hole.onnx")
    data = _vdata(16)
    bad = int((data.arrays["input"][:, 0] < 0).sum())
    assert 0 < bad < 16
    rep = validate(cand, ref, "ref", data, runs=2, warmup=1, batch_size=5, gates={"max_abs_error": 1e-3})
    assert rep.outputs["output"]["non_finite"] == bad == rep.non_finite
    assert {g["gate"]: g["value"] for g in rep.failed}["non_finite_examples"] == bad
    assert any(g["gate"] == "max_abs_error" and g["status"] == "failed" for g in rep.gates)


def test_finite_candidate_has_no_finite_check(tmp_path):
    from lrcompress.edge.validate import validate
    ref = _reference()
    cand = _export(Scaled(ref, 1.0), tmp_path / "same.onnx")
    rep = validate(cand, ref, "ref", _vdata(), runs=2, warmup=1, gates={"max_abs_error": 1e-4})
    assert rep.non_finite == 0 and rep.outputs["output"]["non_finite"] == 0 and not rep.failed


def test_nan_reference_is_a_data_error(tmp_path):
    from lrcompress.edge.validate import validate
    ref = _reference()
    cand = _export(Scaled(ref, 1.0), tmp_path / "same.onnx")
    with pytest.raises(DataError, match="reference model produces NaN/Inf"):
        validate(cand, Scaled(_reference(), float("nan")), "ref", _vdata(), runs=2, warmup=1)


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_time_budget_is_refused_before_anything_runs(budget, tmp_path):
    from lrcompress.edge.validate import check_timing, validate
    with pytest.raises(ConfigError, match="--time-budget"):
        check_timing(50, budget)
    # the candidate does not even exist: the time budget is checked first
    with pytest.raises(ConfigError, match="--time-budget"):
        validate(str(tmp_path / "missing.onnx"), _reference(), "ref", _vdata(), time_budget=budget)


def test_check_timing_accepts_good_values_and_refuses_bad_runs():
    from lrcompress.edge.validate import check_timing
    check_timing(1, None)
    check_timing(50, 0.5)
    for runs in (0, -3, True):
        with pytest.raises(ConfigError, match="--runs"):
            check_timing(runs, None)


def reference_linear() -> nn.Module:
    """CLI source for the validate test: the reference of the exported candidates."""
    return _reference()


def test_cli_validate_nan_candidate_exits_1_with_a_readable_line(tmp_path, capsys):
    cand = _export(Scaled(_reference(), float("nan")), tmp_path / "nan.onnx")
    data = _npy(tmp_path, _vdata().arrays["input"])
    code, out, err = run_main(["validate", cand, "--reference", f"{HERE}:reference_linear", "--data", data,
                               "--runs", "2", "--max-abs-error", "0.1"], capsys)
    assert code == 1, err
    line = [l for l in err.splitlines() if l.startswith("lrcompress: gates failed")][0]
    assert "non_finite_examples 12 vs limit 0" in line and "max_abs_error inf vs limit 0.1" in line
    assert "NaN/Inf" in out
