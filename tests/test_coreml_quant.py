"""Core ML weight compression: int8 / int4 linear quantization and palettization in the Core ML exporter.

Structure only (compression ops, deployment target, sizes): Core ML prediction needs macOS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lrcompress.scoped import torch_threads

pytest.importorskip("coremltools", reason="coremltools not installed (pip install 'lrcompress[coreml]')")

from exporters import (
    BadInput,
    ExportError,
    PredictionUnavailable,
    export_coreml,
    get_exporter,
    inspect_mlpackage,
)
from exporters.coreml_quant import (
    WEIGHT_THRESHOLD,
    compression_summary,
    deployment_target,
    plan_quantization,
)

SPEC_IOS16, SPEC_IOS18 = 7, 9  # Core ML specificationVersion of the iOS16 / iOS18 (macOS13 / macOS15) targets
FORMATS = {
    "fp16": {},
    "fp32": {"precision": "fp32"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "pal4": {"palettize": 4},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    """Two weights above coremltools' weight_threshold (64x256, 256x128) and one below it (128x8)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))
    assert 128 * 8 <= WEIGHT_THRESHOLD < 64 * 256
    return model.eval(), torch.randn(2, 64)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory):
    """Each format of the MLP exported once: name -> (ExportResult, inspect_mlpackage info)."""
    root = tmp_path_factory.mktemp("coreml_quant")
    model, example = _mlp()
    out = {}
    for name, options in FORMATS.items():
        result = get_exporter("coreml").export_with_info(model, example, root / f"{name}.mlpackage", **options)
        out[name] = (result, inspect_mlpackage(result.path))
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(("name", "op", "spec_version"), [
    ("int8", "constexpr_affine_dequantize", SPEC_IOS16),
    ("int4", "constexpr_blockwise_shift_scale", SPEC_IOS18),
    ("pal4", "constexpr_lut_to_dense", SPEC_IOS16),
])
def test_compressed_package_structure(packages, name: str, op: str, spec_version: int) -> None:
    import coremltools as ct

    result, info = packages[name]
    assert result.path.is_dir() and (result.path / "Manifest.json").is_file()
    quant = result.info["quantization"]
    assert quant["compressed_ops"] == {op: 2} and info["compression"]["compressed_ops"] == {op: 2}
    assert info["ops"][op] == 2
    assert quant["weights_quantized"] == 2 and quant["weights_left_float"] == 1  # the 128x8 head is below the threshold
    assert quant["weight_threshold"] == WEIGHT_THRESHOLD and "weight_threshold" in quant["left_float_reason"]
    spec = ct.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    assert spec.specificationVersion == info["spec_version"] >= spec_version
    assert info["model_type"] == "mlProgram" and [o["name"] for o in info["outputs"]] == ["output"]


def test_quantization_info_fields(packages) -> None:
    int8, int4, pal4 = (packages[n][0].info["quantization"] for n in ("int8", "int4", "pal4"))
    assert (int8["mode"], int8["dtype"], int8["granularity"], int8["block_size"]) == ("linear_symmetric", "int8", "per_channel", None)
    assert (int4["mode"], int4["dtype"], int4["granularity"], int4["block_size"]) == ("linear_symmetric", "int4", "per_block", 32)
    assert (pal4["mode"], pal4["nbits"], pal4["granularity"]) == ("kmeans", 4, "per_tensor")
    assert "quantization" not in packages["fp16"][0].info
    assert packages["fp16"][1]["compression"] == {
        "compressed_ops": {}, "weights_quantized": 0, "weights_left_float": 3, "vectors_left_float": 2,  # the 8-element bias is inline
        "large_left_float": 2,  # 64x256 and 256x128; the 128x8 head is under coremltools' threshold
    }


def test_deployment_target_is_raised_only_when_needed(packages) -> None:
    assert packages["int8"][0].info["minimum_target"] == "iOS16" and "minimum_target_reason" not in packages["int8"][0].info
    assert packages["pal4"][0].info["minimum_target"] == "iOS16"
    info = packages["int4"][0].info
    assert info["minimum_target"] == "iOS18"
    assert "iOS18" in info["minimum_target_reason"] and "iOS16" in info["minimum_target_reason"]
    int4 = plan_quantization("int4", 32, None)
    assert deployment_target("macOS13", int4)[0] == "macOS15"
    assert deployment_target("iOS17", int4)[0] == "iOS18"
    assert deployment_target("macOS15", int4) == ("macOS15", None)
    assert deployment_target("iOS17", plan_quantization("int8", 32, None)) == ("iOS17", None)


def test_int8_on_ios18_target_uses_blockwise_op(tmp_path: Path) -> None:
    model, example = _mlp()
    result = export_coreml(model, example, tmp_path / "m.mlpackage", quantize="int8", minimum_target="macOS15")
    assert result.info["minimum_target"] == "macOS15" and "minimum_target_reason" not in result.info
    assert result.info["quantization"]["compressed_ops"] == {"constexpr_blockwise_shift_scale": 2}
    assert inspect_mlpackage(result.path)["spec_version"] >= SPEC_IOS18


def test_compressed_packages_are_smaller(packages) -> None:
    size = {name: info["weight_bytes"] for name, (_, info) in packages.items()}
    total = {name: result.info["bytes"] for name, (result, _) in packages.items()}
    assert size["fp32"] > size["fp16"] > size["int8"] > size["int4"]
    assert size["fp16"] > size["pal4"]
    assert total["fp16"] > total["int8"] > total["int4"]
    assert size["int8"] < 0.6 * size["fp16"] and size["int4"] < 0.4 * size["fp16"]


def test_prediction_is_skipped_off_macos(packages) -> None:
    runner = get_exporter("coreml").load(packages["int4"][0].path)
    if sys.platform == "darwin":
        pytest.skip("numeric check of compressed Core ML models runs only where prediction is possible")
    assert runner.available_for_prediction is False and "macOS" in runner.unavailable_reason
    with pytest.raises(PredictionUnavailable, match="macOS"):
        runner({"input": torch.randn(2, 64).numpy()})


@pytest.mark.parametrize(("options", "words"), [
    ({"quantize": "int3"}, ["quantize='int3'", "int8, int4", "pick one"]),
    ({"quantize": "int8", "palettize": 4}, ["quantize='int8'", "palettize=4", "only one"]),
    ({"palettize": 3}, ["palettize=3", "2, 4, 6, 8"]),
    ({"palettize": 16}, ["palettize=16", "2, 4, 6, 8"]),
    ({"quantize": "int4", "block_size": 24}, ["block_size=24", "positive power of two"]),
    ({"quantize": "int4", "block_size": 0}, ["block_size=0", "positive power of two"]),
    ({"quantize": "int4", "block_size": -32}, ["block_size=-32", "positive power of two"]),
])
def test_bad_options_raise_before_writing(tmp_path: Path, options: dict, words: list[str]) -> None:
    model, example = _mlp()
    target = tmp_path / "sub" / "m.mlpackage"
    with pytest.raises(BadInput) as exc:
        get_exporter("coreml").export(model, example, target, **options)
    msg = _one_line(exc)
    assert all(w in msg for w in words), msg
    assert not target.exists() and not target.parent.exists()


def test_plan_accepts_none_and_rejects_odd_types() -> None:
    assert plan_quantization(None, 32, None) is None and plan_quantization("none", 32, None) is None
    assert plan_quantization(None, 32, 8).nbits == 8
    for bad in ({"palettize": True}, {"palettize": 4.0}, {"block_size": 32.0}, {"block_size": True}):
        args = {"quantize": "int4", "block_size": 32, "palettize": None} | bad
        if "palettize" in bad:
            args["quantize"] = None
        with pytest.raises(BadInput):
            plan_quantization(**args)


def test_nothing_large_enough_is_reported_not_an_error(tmp_path: Path) -> None:
    """Every weight under coremltools' threshold: the package stays float and says so (a multi-target export
    with --quantize of a small model must not fail on Core ML); a weight left float above it is an error (below)."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()  # all weights <= threshold
    result = export_coreml(small, torch.randn(2, 16), tmp_path / "s.mlpackage", quantize="int8")
    q = result.info["quantization"]
    assert q["compressed_ops"] == {} and q["large_left_float"] == 0 and "stays float" in q["note"]
    assert "weight_threshold" in q["left_float_reason"] and result.path.exists()


def test_int4_block_size_that_divides_no_weight_is_an_error(tmp_path: Path) -> None:
    model, example = _mlp()  # input channels 64 and 256: a block of 512 fits neither
    with pytest.raises(ExportError) as exc:
        export_coreml(model, example, tmp_path / "b.mlpackage", quantize="int4", block_size=512)
    assert "block_size=512" in _one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_int4_block_size_option_reaches_coremltools(tmp_path: Path) -> None:
    model, example = _mlp()
    result = export_coreml(model, example, tmp_path / "b.mlpackage", quantize="int4", block_size=64)
    quant = result.info["quantization"]
    assert quant["block_size"] == 64 and quant["weights_quantized"] == 2
    assert compression_summary(
        __import__("coremltools").models.MLModel(str(result.path), skip_model_load=True).get_spec()
    )["compressed_ops"] == {"constexpr_blockwise_shift_scale": 2}


def test_lrcompress_export_passes_quantize_to_coreml(tmp_path: Path) -> None:
    """``lrcompress export --to coreml --quantize int4`` reaches coremltools: per-block int4 ops, target iOS18."""
    from lrcompress.edge.artifacts import export_all
    model, example = _mlp()
    rows = export_all(model, {"input": example}, tmp_path / "edge", ["coreml"], quantize="int4", block_size=32)
    q = rows[0]["info"]["quantization"]
    assert q["dtype"] == "int4" and q["block_size"] == 32 and q["compressed_ops"].get("constexpr_blockwise_shift_scale") == 2
    assert rows[0]["info"]["minimum_target"] == "iOS18"
