"""Hostile input to export (issue 11): a forward that leaves torch must not be exported as a constant,
the exporter's torchvision log lines stay quiet (with the logger restored), and NaN weights are refused.
Every failure exits 2 with one line, writes nothing and leaves the input files unchanged."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.odd_models import numpy_net
from tests.conftest import MLP, Env, check_error_text, leftovers, run_main, snapshot

exporters = pytest.importorskip("exporters")
pytest.importorskip("onnxruntime")

NUMPY_NET = "tests.odd_models:numpy_net"
REGISTRATION = "torch.onnx._internal.exporter._registration"


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of each file, to show a failed run left its inputs byte-identical."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def features(env: Env, n: int = 4, d: int = 8) -> Path:
    return env.npy(np.random.default_rng(0).standard_normal((n, d)).astype(np.float32), "x.npy")


# --------------------------------------------------------------------------- 1. inputs lost by the exporter


EXPORT_NUMPY_NET = {
    "onnx": ["exported graph has 0 inputs", "legacy exporter"],
    "ort": ["exported graph has 0 inputs", "legacy exporter"],
    "coreml": ["Core ML program ignores its inputs"],
}


@pytest.mark.parametrize("target", sorted(EXPORT_NUMPY_NET))
def test_export_numpy_round_trip_exits_2(target: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if target == "coreml":
        pytest.importorskip("coremltools")
    env = Env(tmp_path)
    x = features(env)
    before, files = digests(x), snapshot(tmp_path)
    code, stdout, err = run_main(["export", NUMPY_NET, "--to", target, "--inputs", x, "-o", env.out], capsys)
    common = ["['input']", "numpy round trip", "keep the forward in torch ops"]
    check_error_text(code, err, EXPORT_NUMPY_NET[target] + common)
    assert stdout == ""
    assert not env.out.exists()
    assert not leftovers(tmp_path) and not list(tmp_path.glob(".out.tmp-*"))
    assert snapshot(tmp_path) == files
    assert digests(x) == before


def test_export_onnx_numpy_round_trip_raises_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "net.onnx"
    x = torch.randn(4, 8)
    with pytest.raises(exporters.ExportError, match=r"0 inputs but the model takes \['input'\]"):
        exporters.export_onnx(numpy_net(), x, target)
    assert list(tmp_path.iterdir()) == []


class PartlyNumpy(nn.Module):
    """One branch in torch, one through numpy: the graph keeps its input but bakes the second branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(torch.from_numpy(x.detach().numpy()))


class NumpyTimesZero(nn.Module):
    """Reads its input only through ``0 * x``: the graph has the input, yet its output never changes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.from_numpy(x.detach().numpy())) + 0 * x.sum()


@pytest.mark.parametrize(("model", "message"), [
    (PartlyNumpy, r"does not follow the model on a second example: output 'output' differs from torch by relative error"),
    (NumpyTimesZero, r"ignores its inputs \['input'\]: on a second example torch's output 'output' changes"),
])
def test_export_onnx_graph_that_does_not_follow_torch_raises(model: type[nn.Module], message: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(exporters.ExportError, match=message) as exc:
        exporters.export_onnx(model(), torch.randn(4, 8), tmp_path / "net.onnx")
    assert "legacy exporter" in str(exc.value) and "keep the forward in torch ops" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_strict_numpy_round_trip_names_the_exporter_failure(tmp_path: Path) -> None:
    with pytest.raises(exporters.ExportError, match="torch.export-based exporter"):
        exporters.export_onnx(numpy_net(), torch.randn(4, 8), tmp_path / "net.onnx", legacy_fallback=False)
    assert list(tmp_path.iterdir()) == []


def test_export_coreml_numpy_round_trip_raises_and_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    with pytest.raises(exporters.ExportError, match=r"ignores its inputs \['input'\].*numpy round trip"):
        exporters.export_coreml(numpy_net(), torch.randn(4, 8), tmp_path / "net.mlpackage")
    assert list(tmp_path.iterdir()) == []


def test_good_export_passes_the_output_check(tmp_path: Path) -> None:
    from tests.models import tiny_token_model

    ids = torch.randint(1, 199, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    res = exporters.export_onnx(tiny_token_model(), {"input_ids": ids, "attention_mask": mask}, tmp_path / "tok.onnx")
    assert res.info["output_check"] == "passed"
    assert [i["name"] for i in exporters.inspect_onnx(res.path)["inputs"]] == ["input_ids", "attention_mask"]


def test_second_example_is_deterministic_and_valid() -> None:
    from exporters.io_spec import second_example

    ids = torch.tensor([[5, 9, 17, 3], [4, 4, 12, 0]])
    inputs = {
        "x": torch.randn(3, 4, generator=torch.Generator().manual_seed(1)) * 50,
        "input_ids": ids,
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "token_type_ids": torch.zeros(2, 4, dtype=torch.long),
        "flags": torch.tensor([True, False]),
    }
    a, b = second_example(inputs), second_example(inputs)
    assert all(torch.equal(a[k], b[k]) for k in inputs)
    assert not torch.equal(a["x"], inputs["x"]) and a["x"].dtype == torch.float32
    assert 0.1 < float((a["x"] - inputs["x"]).std() / inputs["x"].std()) < 10
    assert not torch.equal(a["input_ids"], ids) and a["input_ids"].dtype == ids.dtype
    assert int(a["input_ids"].min()) >= 0 and int(a["input_ids"].max()) <= 17
    assert torch.equal(a["attention_mask"], torch.ones(2, 4, dtype=torch.long))
    assert torch.equal(a["token_type_ids"], inputs["token_type_ids"])
    assert torch.equal(a["flags"], inputs["flags"])


# --------------------------------------------------------------------------- 2. torchvision log lines


def test_export_onnx_prints_no_torchvision_lines_and_restores_the_logger(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger(REGISTRATION)
    level = logger.level
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        res = exporters.export_onnx(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), torch.randn(2, 8), tmp_path / "s.onnx")
        with pytest.raises(exporters.ExportError):
            exporters.export_onnx(numpy_net(), torch.randn(2, 8), tmp_path / "bad.onnx")
    out, err = capfd.readouterr()
    assert "torchvision" not in out + err
    assert "torchvision" not in caplog.text
    assert not any("torchvision" in line for line in res.info["log"])
    assert logger.level == level
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]


# --------------------------------------------------------------------------- 3. NaN weights


def test_export_nan_weights_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.models import tiny_mlp

    env = Env(tmp_path)
    state = tiny_mlp().state_dict()
    state["fc2.weight"] = state["fc2.weight"].clone()
    state["fc2.weight"][3, 7] = float("nan")
    weights = env.weights(state, "nan.safetensors")
    x = env.npy(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32), "x.npy")
    before, files = digests(weights, x), snapshot(tmp_path)
    code, stdout, err = run_main(["export", MLP, "--weights", weights, "--to", "onnx", "--inputs", x, "-o", env.out],
                                 capsys)
    check_error_text(code, err, ["parameter 'fc2.weight' contains NaN or Inf", "before exporting"])
    assert stdout == ""
    assert not env.out.exists() and not leftovers(tmp_path)
    assert snapshot(tmp_path) == files
    assert digests(weights, x) == before


def test_check_finite_weights_names_the_first_parameter_then_buffer() -> None:
    from lrcompress.errors import WeightError
    from lrcompress.planning.targets import check_finite

    def check_finite_weights(model: nn.Module) -> None:
        check_finite(model, "exporting")

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    check_finite_weights(model)
    model[1].running_var[2] = float("inf")
    with pytest.raises(WeightError, match=r"^buffer '1.running_var' contains NaN or Inf"):
        check_finite_weights(model)
    with torch.no_grad():
        model[2].bias[0] = float("nan")
        model[0].weight[1, 1] = float("nan")
    with pytest.raises(WeightError, match=r"^parameter '0.weight' contains NaN or Inf; fix or re-export the "
                                          r"checkpoint before exporting"):
        check_finite_weights(model)
