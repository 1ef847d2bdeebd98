"""Tests of the top-level `exporters` package on toy models: ONNX, ORT format, int8, fp16, Core ML, bad input."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import exporters
from exporters import (
    BadInput,
    CorruptArtifact,
    ExportError,
    MissingDependency,
    PredictionUnavailable,
    UnsupportedOp,
    convert_onnx_to_ort,
    get_exporter,
    inspect_mlpackage,
    inspect_onnx,
    ort_runner,
    quantize_int8,
    run_latency,
)

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
HAS_COREML = importlib.util.find_spec("coremltools") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime/onnxscript not installed (pip install 'lrcompress[onnx]')")
needs_coreml = pytest.mark.skipif(not HAS_COREML, reason="coremltools not installed (pip install 'lrcompress[coreml]')")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Keep these tests light on shared CPUs; restore the thread count for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ toy models


class MLP(nn.Module):
    """(B, 32) -> (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LowRankMLP(nn.Module):
    """A Linear(32, 64) split in two factors: two MatMuls in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(32, 8, bias=False)
        self.up = nn.Linear(8, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class TinyTokenModel(nn.Module):
    """Keyword inputs input_ids + attention_mask -> (B, T, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        return h * attention_mask.unsqueeze(-1).to(h.dtype)


class ConvNet(nn.Module):
    """(B, 3, 16, 16) -> (B, 10) with Conv2d / BatchNorm / ReLU / pooling / Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _tokens(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _make(name: str) -> tuple[nn.Module, object, dict[str, torch.Tensor]]:
    """(model, example inputs, test inputs at another batch/sequence size)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":  # batch-1 example: the exporter must still keep the batch axis dynamic
        return MLP().eval(), torch.randn(1, 32, generator=g), {"input": torch.randn(5, 32, generator=g)}
    if name == "lowrank":
        return LowRankMLP().eval(), torch.randn(4, 32, generator=g), {"input": torch.randn(3, 32, generator=g)}
    if name == "token":
        return TinyTokenModel().eval(), OrderedDict(_tokens(2, 5, 0)), _tokens(3, 9, 1)
    if name == "conv":
        model = ConvNet()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            model.features[1].running_mean.uniform_(-0.5, 0.5)
            model.features[1].running_var.uniform_(0.5, 2.0)
        return model.eval(), torch.randn(2, 3, 16, 16, generator=g), {"input": torch.randn(3, 3, 16, 16, generator=g)}
    raise KeyError(name)


def _torch_out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = model(inputs["input"]) if list(inputs) == ["input"] else model(**inputs)
    return out.numpy()


def _np(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


MODELS = ("mlp", "lowrank", "token", "conv")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """Export each toy model to ONNX once per module (lazily), keyed by model name."""
    root = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, example, test_inputs = _make(name)
            result = get_exporter("onnx").export_with_info(model, example, root / f"{name}.onnx")
            cache[name] = (model, test_inputs, result)
        return cache[name]

    return get


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ interface


def test_import_does_not_load_heavy_dependencies() -> None:
    code = (
        "import sys, exporters; exporters.exporter_names(); "
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'coremltools') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_registry_names_suffixes_and_extras() -> None:
    assert exporters.exporter_names() == ["coreml", "onnx", "ort"]
    onnx_exp, ort_exp, ml_exp = (get_exporter(n) for n in ("onnx", "ort", "coreml"))
    assert (onnx_exp.suffix, ort_exp.suffix, ml_exp.suffix) == (".onnx", ".ort", ".mlpackage")
    assert (onnx_exp.extra, ort_exp.extra, ml_exp.extra) == ("onnx", "onnx", "coreml")
    assert exporters.exporter_for_path("a/b/model.mlpackage/") is ml_exp
    assert set(exporters.available_exporters()) == {"coreml", "onnx", "ort"}


def test_unknown_exporter_lists_valid_names() -> None:
    with pytest.raises(BadInput) as exc:
        get_exporter("tflite")
    msg = _one_line(exc)
    assert "'tflite'" in msg and "coreml, onnx, ort" in msg


def test_unknown_option_and_bad_values_are_rejected(tmp_path: Path) -> None:
    model, example, _ = _make("lowrank")
    with pytest.raises(BadInput, match="unknown option.*quantise.*valid: opset"):
        get_exporter("onnx").export(model, example, tmp_path / "m.onnx", quantise=True)
    if HAS_ONNX:
        with pytest.raises(BadInput, match="opset=17"):
            get_exporter("onnx").export(model, example, tmp_path / "m.onnx", opset=17)
        with pytest.raises(BadInput, match=r"must end with '\.onnx'"):
            get_exporter("onnx").export(model, example, tmp_path / "m.bin")
    with pytest.raises(BadInput, match="example_inputs"):
        exporters.io_spec.normalize_inputs("not a tensor")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ ONNX


@needs_onnx
@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_torch_at_other_sizes(exported, name: str) -> None:
    model, test_inputs, result = exported(name)
    info = result.info
    assert result.path.exists() and info["exporter"] == "dynamo" and info["fallback_reason"] is None
    assert info["output_names"] == ["output"]
    summary = inspect_onnx(result.path)
    assert summary["opset"] >= 18
    first = summary["inputs"][0]
    assert first["shape"][0] == "batch"
    if name == "token":
        assert [i["name"] for i in summary["inputs"]] == ["input_ids", "attention_mask"]
        assert first["shape"] == ["batch", "sequence"]
    else:
        assert [i["name"] for i in summary["inputs"]] == ["input"]
        assert all(isinstance(d, int) for d in first["shape"][1:])  # float inputs: only batch is dynamic
    runner = ort_runner(result.path, threads=1)
    assert runner.input_names == list(test_inputs) and runner.output_names == ["output"]
    got = runner(_np(test_inputs))["output"]
    want = _torch_out(model, test_inputs)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


@needs_onnx
@pytest.mark.parametrize("name", MODELS)
def test_ort_format_loads_and_matches_onnx(exported, tmp_path: Path, name: str) -> None:
    _, test_inputs, result = exported(name)
    info = convert_onnx_to_ort(result.path, tmp_path / f"{name}.ort")
    assert info["optimization_style"] == "Fixed" and info["bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.ort"]
    feed = _np(test_inputs)
    ort_out = get_exporter("ort").load(tmp_path / f"{name}.ort", threads=1)(feed)["output"]
    onnx_out = ort_runner(result.path)(feed)["output"]
    assert np.abs(ort_out - onnx_out).max() <= 1e-5


@needs_onnx
def test_ort_exporter_end_to_end_with_mobile_report(tmp_path: Path) -> None:
    model, example, test_inputs = _make("token")
    result = get_exporter("ort").export_with_info(model, example, tmp_path / "token.ort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token.ort"]
    report = result.info["mobile_usability"]
    assert isinstance(report["try_nnapi_or_coreml"], bool)
    assert set(report["execution_providers"]) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    nnapi = report["execution_providers"]["NNAPI"]
    assert nnapi["nodes"] > 0 and nnapi["suitability"] in {"NO", "MAYBE", "YES"}
    assert report["dynamic_inputs"] == ["input_ids", "attention_mask"] and "NNAPI" in report["log"]
    got = ort_runner(result.path)(_np(test_inputs))["output"]
    assert np.abs(got - _torch_out(model, test_inputs)).max() <= 1e-4


@needs_onnx
def test_int8_quantizes_both_low_rank_factors(exported, tmp_path: Path) -> None:
    model, test_inputs, result = exported("lowrank")
    info = quantize_int8(result.path, tmp_path / "lowrank.int8.onnx").info
    assert sum(info["quantized_ops"].values()) >= 2, info  # both factors (MatMul, then Gemm->MatMul)
    inspect = inspect_onnx(tmp_path / "lowrank.int8.onnx")
    assert inspect["ops"].get("MatMul", 0) == 0 and inspect["ops"].get("Gemm", 0) == 0, inspect["ops"]
    got = ort_runner(tmp_path / "lowrank.int8.onnx")(_np(test_inputs))["output"]
    want = _torch_out(model, test_inputs)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-3


@needs_onnx
def test_int8_file_is_smaller(exported, tmp_path: Path) -> None:
    model, test_inputs, result = exported("mlp")
    info = quantize_int8(result.path, tmp_path / "mlp.int8.onnx").info
    assert info["bytes"] < 0.5 * info["source_bytes"], info
    got = ort_runner(tmp_path / "mlp.int8.onnx")(_np(test_inputs))["output"]
    want = _torch_out(model, test_inputs)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-3


@needs_onnx
def test_export_option_int8_writes_quantized_model(tmp_path: Path) -> None:
    model, example, test_inputs = _make("lowrank")
    result = get_exporter("onnx").export_with_info(model, example, tmp_path / "q.onnx", int8=True)
    assert result.info["quantization"]["quantized_ops"] and sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    assert ort_runner(result.path)(_np(test_inputs))["output"].shape == (3, 64)


@needs_onnx
def test_fp16_export_matches_loosely(exported, tmp_path: Path) -> None:
    import onnx

    model, example, test_inputs = _make("mlp")
    result = get_exporter("onnx").export_with_info(model, example, tmp_path / "mlp16.onnx", fp16=True)
    proto = onnx.load(str(result.path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert result.info["bytes"] < 0.6 * exported("mlp")[2].info["bytes"]
    got = ort_runner(result.path)(_np(test_inputs))["output"]
    want = _torch_out(model, test_inputs)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-2 * np.abs(want).max() + 1e-3


@needs_onnx
def test_export_restores_training_mode_and_uses_eval(tmp_path: Path) -> None:
    model, example, _ = _make("conv")
    model.train()
    result = get_exporter("onnx").export(model, example, tmp_path / "conv.onnx", dynamic=False)
    assert model.training and model.features[1].training
    got = ort_runner(result)(_np({"input": example}))["output"]
    model.eval()
    assert np.abs(got - _torch_out(model, {"input": example})).max() <= 1e-4
    assert inspect_onnx(result)["inputs"][0]["shape"] == [2, 3, 16, 16]


@needs_onnx
def test_legacy_fallback_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable in this test")

    monkeypatch.setattr(exporters.onnx_export, "_export_dynamo", broken)
    model, example, test_inputs = _make("token")
    result = get_exporter("onnx").export_with_info(model, example, tmp_path / "legacy.onnx")
    assert result.info["exporter"] == "legacy"
    assert result.info["fallback_reason"] == "dynamo exporter unavailable in this test"
    got = ort_runner(result.path)(_np(test_inputs))["output"]  # dynamic axes via dynamic_axes
    assert np.abs(got - _torch_out(model, test_inputs)).max() <= 1e-4


class SizeScaled(nn.Module):
    """Scales its output by the batch size through a Python float: a tracer bakes the example's size in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float(x.shape[0])


@needs_onnx
def test_graph_that_baked_a_dynamic_size_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter unavailable in this test")

    monkeypatch.setattr(exporters.onnx_export, "_export_dynamo", broken)
    torch.manual_seed(0)
    with pytest.raises(ExportError, match=r"does not follow the model at other sizes along its dynamic axes \(batch 5\)"):
        get_exporter("onnx").export_with_info(SizeScaled(), torch.randn(4, 8), tmp_path / "baked.onnx")
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_dynamic_axes_are_checked_at_other_sizes(tmp_path: Path) -> None:
    model, example, _ = _make("token")
    info = get_exporter("onnx").export_with_info(model, example, tmp_path / "tok.onnx").info
    sizes = info["dynamic_check"]["sizes"]
    assert info["dynamic_check"]["status"] == "passed" and info["dynamic_check"]["rel_l2"] < 1e-4
    assert sizes == {"batch": example["input_ids"].shape[0] + 1, "sequence": example["input_ids"].shape[1] - 1}
    fixed = get_exporter("onnx").export_with_info(model, example, tmp_path / "fixed.onnx", dynamic=False).info
    assert fixed["dynamic_check"]["status"].startswith("skipped (no dynamic axis")


@needs_onnx
def test_external_data_for_large_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporters.onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as "over 2 GB"
    model, example, test_inputs = _make("lowrank")
    result = get_exporter("onnx").export_with_info(model, example, tmp_path / "big.onnx")
    assert result.info["external_data"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert inspect_onnx(result.path)["external_data"] is True
    got = ort_runner(result.path)(_np(test_inputs))["output"]
    assert np.abs(got - _torch_out(model, test_inputs)).max() <= 1e-4
    with pytest.raises(BadInput, match="external data"):
        convert_onnx_to_ort(result.path, tmp_path / "big.ort")
    assert not (tmp_path / "big.ort").exists()


@needs_onnx
def test_hf_model_output_names(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    result = get_exporter("onnx").export_with_info(model, _tokens(2, 6, 0), tmp_path / "bert.onnx")
    assert result.info["output_names"] == ["last_hidden_state", "pooler_output"]
    test_inputs = _tokens(3, 11, 2)
    got = ort_runner(result.path)(_np(test_inputs))
    with torch.no_grad():
        want = model(**test_inputs)
    assert np.abs(got["last_hidden_state"] - want.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(got["pooler_output"] - want.pooler_output.numpy()).max() <= 1e-4


@needs_onnx
def test_runner_rejects_bad_inputs(exported) -> None:
    _, test_inputs, result = exported("token")
    runner = ort_runner(result.path)
    with pytest.raises(BadInput) as exc:
        runner({"input_ids": test_inputs["input_ids"].numpy()})
    assert "missing attention_mask" in _one_line(exc)
    with pytest.raises(BadInput, match="expects int64"):
        runner({"input_ids": np.zeros((2, 3), np.float32), "attention_mask": np.ones((2, 3), np.int64)})
    out = runner({k: v.numpy().astype(np.int32) for k, v in test_inputs.items()})  # int32 is cast
    assert out["output"].shape == (3, 9, 16)


@needs_onnx
def test_run_latency_reports_percentiles(exported) -> None:
    _, test_inputs, result = exported("mlp")
    seen: list[int] = []
    stats = run_latency(ort_runner(result.path, threads=1), _np(test_inputs), warmup=2, runs=10,
                        progress=lambda done, total: seen.append(done))
    assert stats["runs"] == 10 and seen == list(range(1, 11))
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    budget = run_latency(lambda feed: None, {}, warmup=0, runs=1000, time_budget_s=1e-9)
    assert budget["runs"] == 1


# ------------------------------------------------------------------------------------------------ failures


@torch.library.custom_op("lrtest::no_onnx_op", mutates_args=())
def _no_onnx_op(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_no_onnx_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class OddBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _no_onnx_op(x)


@needs_onnx
def test_unsupported_op_names_op_and_layer_and_leaves_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), OddBlock())).eval()
    target = tmp_path / "odd.onnx"
    target.write_bytes(b"previous artifact")
    with pytest.raises(UnsupportedOp) as exc:
        get_exporter("onnx").export(model, torch.randn(2, 4), target)
    msg = _one_line(exc)
    assert "no_onnx_op" in msg and "module '1.1' (OddBlock)" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.onnx"]  # temp files cleaned
    assert target.read_bytes() == b"previous artifact"  # the old file is untouched


@needs_onnx
def test_corrupt_onnx_and_ort_files(tmp_path: Path) -> None:
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 3)
    bad_ort = tmp_path / "bad.ort"
    bad_ort.write_bytes(b"not a flatbuffer" * 10)
    for call in (lambda: ort_runner(bad_onnx), lambda: inspect_onnx(bad_onnx), lambda: ort_runner(bad_ort),
                 lambda: exporters.inspect_ort(bad_ort), lambda: convert_onnx_to_ort(bad_onnx, tmp_path / "x.ort"),
                 lambda: quantize_int8(bad_onnx, tmp_path / "x.onnx")):
        with pytest.raises(CorruptArtifact) as exc:
            call()
        assert "re-export" in _one_line(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "bad.ort"]
    with pytest.raises(BadInput, match="does not exist"):
        ort_runner(tmp_path / "missing.onnx")


def test_missing_dependency_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    monkeypatch.setitem(sys.modules, "coremltools", None)
    assert not get_exporter("onnx").available() and not get_exporter("coreml").available()
    assert "pip install 'lrcompress[coreml]'" in get_exporter("coreml").unavailable_reason()
    with pytest.raises(MissingDependency) as exc:
        ort_runner(tmp_path / "model.onnx")
    assert _one_line(exc) == "onnxruntime is not installed; pip install 'lrcompress[onnx]'"
    model, example, _ = _make("lowrank")
    with pytest.raises(MissingDependency, match=r"lrcompress\[onnx\]"):
        get_exporter("onnx").export(model, example, tmp_path / "m.onnx")
    with pytest.raises(MissingDependency, match=r"coremltools is not installed; pip install 'lrcompress\[coreml\]'"):
        get_exporter("coreml").export(model, example, tmp_path / "m.mlpackage")
    with pytest.raises(MissingDependency, match=r"lrcompress\[coreml\]"):
        inspect_mlpackage(tmp_path / "m.mlpackage")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ Core ML


@needs_coreml
@pytest.mark.parametrize("name", MODELS)
def test_coreml_convert_and_inspect(tmp_path: Path, name: str) -> None:
    model, example, _ = _make(name)
    exporter = get_exporter("coreml")
    result = exporter.export_with_info(model, example, tmp_path / f"{name}.mlpackage")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.mlpackage"]
    assert result.info["capture"] in {"trace", "export"} and result.info["precision"] == "fp16"
    info = inspect_mlpackage(result.path)
    assert info["model_type"] == "mlProgram" and info["weight_bytes"] > 0 and info["op_count"] > 0
    assert [o["name"] for o in info["outputs"]] == ["output"]
    inputs = {i["name"]: i for i in info["inputs"]}
    if name == "token":
        assert list(inputs) == ["input_ids", "attention_mask"]
        assert inputs["input_ids"]["dtype"] == "int32"
        assert inputs["input_ids"]["shape_range"] == [(1, 64), (1, 512)]  # flexible batch and sequence
        assert "gather" in info["ops"]
    else:
        assert list(inputs) == ["input"] and inputs["input"]["dtype"] == "float32"
        first = inputs["input"]
        assert first["shape_range"][0] == (1, 64) and first["shape"][1:] == list(example.shape[1:])
        assert ("conv" in info["ops"]) == (name == "conv")
        assert "linear" in info["ops"] or "matmul" in info["ops"]
    runner = exporter.load(result.path)
    assert runner.input_names == list(inputs) and runner.output_names == ["output"]
    if sys.platform != "darwin":
        assert runner.available_for_prediction is False
        with pytest.raises(PredictionUnavailable, match="macOS"):
            runner({})


@needs_coreml
def test_coreml_fp32_precision_keeps_full_weights(tmp_path: Path) -> None:
    model, example, _ = _make("mlp")
    fp16 = inspect_mlpackage(get_exporter("coreml").export(model, example, tmp_path / "a.mlpackage"))
    fp32 = inspect_mlpackage(get_exporter("coreml").export(model, example, tmp_path / "b.mlpackage", precision="fp32"))
    n_params = sum(p.numel() for p in model.parameters())
    assert fp32["weight_bytes"] >= 4 * n_params > fp16["weight_bytes"] >= 2 * n_params


@needs_coreml
@pytest.mark.parametrize("name", ["mlp", "token"])
def test_coreml_torch_export_capture(tmp_path: Path, name: str) -> None:
    model, example, _ = _make(name)
    result = get_exporter("coreml").export_with_info(model, example, tmp_path / "x.mlpackage", capture="export")
    assert result.info["capture"] == "export"
    info = inspect_mlpackage(result.path)
    assert info["inputs"][0]["shape_range"][0] == (1, 64) and info["weight_bytes"] > 0


@needs_coreml
def test_coreml_unsupported_op_names_op_and_layer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), OddBlock())).eval()
    with pytest.raises(UnsupportedOp) as exc:
        get_exporter("coreml").export(model, torch.randn(2, 4), tmp_path / "odd.mlpackage")
    msg = _one_line(exc)
    assert "no_onnx_op" in msg and "module '1.1' (OddBlock)" in msg and "Core ML" in msg, msg
    assert list(tmp_path.iterdir()) == []


@needs_coreml
def test_corrupt_mlpackage(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file.mlpackage"
    not_a_dir.write_text("nope")
    garbage = tmp_path / "garbage.mlpackage"
    (garbage / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (garbage / "Manifest.json").write_text("{not json")
    model, example, _ = _make("lowrank")
    broken = get_exporter("coreml").export(model, example, tmp_path / "broken.mlpackage")
    spec_file = next(broken.rglob("model.mlmodel"))
    spec_file.write_bytes(b"\xff\xfe garbage spec")
    for path in (not_a_dir, garbage, broken):
        with pytest.raises(CorruptArtifact) as exc:
            inspect_mlpackage(path)
        assert "re-export" in _one_line(exc)
        with pytest.raises(CorruptArtifact):
            get_exporter("coreml").load(path)
