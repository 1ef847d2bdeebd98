"""exporters/ as a boundary: lrcompress reaches every target through the registry and its one result type. A toy
exporter registered here is picked up by export_all, the CLI and validate without any change to lrcompress; int8
is an ExportResult-returning transform; chains are ordered by the registry; the torch runner and the output
comparison live in exporters."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import exporters
from exporters import BadInput, Exporter, ExportResult, Runner, TorchRunner
from tests.conftest import MLP, run_main
from tests.models import tiny_mlp, tiny_token_model

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime/onnxscript not installed")


# ------------------------------------------------------------------------------------------------ toy exporters


class NpzExporter(Exporter):
    """Writes the model's outputs on the example inputs to an .npz; its runner replays them."""

    name = "npz"
    suffix = ".npz"
    extra = "dev"
    options = ("fp16",)

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        self.check_options(options)
        feed = {k: v.numpy() for k, v in example_inputs.items()}
        outputs = TorchRunner(model)(feed)
        if options.get("fp16"):
            outputs = {k: v.astype(np.float16) for k, v in outputs.items()}
        np.savez(path, **outputs)
        return ExportResult(Path(path), {"outputs": sorted(outputs), "fp16": bool(options.get("fp16"))})

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        raise NotImplementedError

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        with np.load(path) as z:
            return {"outputs": [{"name": n} for n in z.files]}


class Pt2Exporter(Exporter):
    """A torch.export program (.pt2) with a dynamic batch axis, run back in torch: a real runtime of its own."""

    name = "pt2"
    suffix = ".pt2"
    extra = "dev"

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        self.check_options(options)
        args = tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in example_inputs.values())  # batch 1 would specialise
        batch = torch.export.Dim("batch", min=1, max=1024)
        ep = torch.export.export(model.eval(), args, dynamic_shapes=tuple({0: batch} for _ in args))
        torch.export.save(ep, str(path))
        return ExportResult(Path(path), {"inputs": list(example_inputs)})

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        return Pt2Runner(torch.export.load(str(path)).module())

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return {"bytes": Path(path).stat().st_size}


class Pt2Runner:
    """The program's module on the feed's arrays, in order (a graph module cannot be put in eval mode)."""

    available_for_prediction = True

    def __init__(self, module: Any) -> None:
        self.module = module
        self.input_names: list[str] = []
        self.output_names = ["output"]

    def __call__(self, inputs: Any) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"output": self.module(*(torch.from_numpy(v) for v in inputs.values())).numpy()}


class OpCountExporter(Exporter):
    """Derived from the ONNX step: a JSON of the op counts of the ONNX file it is handed."""

    name = "opcount"
    suffix = ".ops.json"
    extra = "onnx"
    derives_from = "onnx"

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        raise BadInput("opcount converts an ONNX file; use it in a chain")

    def derive(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        ops = exporters.inspect_onnx(source)["ops"]
        Path(path).write_text(json.dumps(ops))
        return ExportResult(Path(path), {"from": Path(source).name, "ops": ops})

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        raise NotImplementedError

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return json.loads(Path(path).read_text())


@pytest.fixture
def toys() -> Iterator[dict[str, Exporter]]:
    """The toy exporters registered for one test, then removed."""
    made = {cls.name: exporters.register(cls()) for cls in (NpzExporter, Pt2Exporter, OpCountExporter)}
    try:
        yield made
    finally:
        for name in made:
            exporters.unregister(name)


def _mlp_inputs() -> dict[str, torch.Tensor]:
    return {"input": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_targets_transforms_and_runtimes(toys: dict[str, Exporter]) -> None:
    assert exporters.target_names() == ["onnx", "ort", "coreml", "npz", "pt2", "opcount"]
    assert exporters.transform_names() == ["int8", "int4"] and "int8" not in exporters.exporter_names()
    assert exporters.runtime_names() == ["onnxruntime", "coreml", "npz", "pt2", "opcount"]
    assert exporters.exporter_for_path("out/model.npz") is toys["npz"]
    assert exporters.exporter_for_path("out/model.int8.onnx").name == "onnx"
    assert exporters.exporter_for_runtime("onnxruntime").name == "onnx"
    int8 = exporters.get_exporter("int8")
    assert int8.transform and int8.derives_from == "onnx" and int8.file_name("m") == "m.int8.onnx"
    with pytest.raises(BadInput, match="valid: coreml, npz, onnx, opcount, ort, pt2 .transforms: int8."):
        exporters.get_exporter("tflite")


def test_unregister_restores_the_builtins(toys: dict[str, Exporter]) -> None:
    assert exporters.unregister("npz") is toys["npz"] and exporters.unregister("npz") is None
    assert "npz" not in exporters.target_names()
    with pytest.raises(BadInput, match="register"):
        exporters.register(NpzExporter)  # type: ignore[arg-type]


def test_chain_order_comes_from_the_registry() -> None:
    def plan(targets: list[str], transforms: tuple[str, ...] = ()) -> list[tuple[str, str, str | None, bool]]:
        return [(s.label, s.file_name, s.source, s.keep) for s in exporters.plan_exports(targets, transforms)]

    # ort after onnx, and converted from the int8 file when quantizing; int8 right after its source
    assert plan(["ort"]) == [("onnx", "model.onnx", None, False), ("ort", "model.ort", "onnx", True)]
    assert plan(["coreml", "ort", "onnx"], ("int8",)) == [
        ("onnx", "model.onnx", None, True), ("onnx-int8", "model.int8.onnx", "onnx", True),
        ("ort", "model.ort", "onnx-int8", True), ("coreml", "model.mlpackage", None, True)]
    assert plan(["ort"], ("int8",)) == [("onnx", "model.onnx", None, False),
                                        ("onnx-int8", "model.int8.onnx", "onnx", False),
                                        ("ort", "model.ort", "onnx-int8", True)]
    assert plan(["coreml"], ("int8",)) == [("coreml", "model.mlpackage", None, True)]  # no ONNX, nothing to quantize
    with pytest.raises(BadInput, match="'tflite'"):
        exporters.plan_exports(["onnx", "tflite"])
    with pytest.raises(BadInput, match="transform.*'int3'"):
        exporters.plan_exports(["onnx"], ("int3",))
    with pytest.raises(BadInput, match="none"):
        exporters.plan_exports([])


def test_chain_refuses_a_derivation_loop() -> None:
    class A(OpCountExporter):
        name, suffix, derives_from = "loop-a", ".a", "loop-b"

    class B(OpCountExporter):
        name, suffix, derives_from = "loop-b", ".b", "loop-a"

    exporters.register(A())
    exporters.register(B())
    try:
        with pytest.raises(BadInput, match="loop"):
            exporters.plan_exports(["loop-a"])
    finally:
        exporters.unregister("loop-a")
        exporters.unregister("loop-b")


# ------------------------------------------------------------------------------------------------ lrcompress


def test_export_all_picks_up_a_registered_exporter(toys: dict[str, Exporter], tmp_path: Path) -> None:
    from lrcompress.edge.artifacts import TARGETS, export_all, target_names
    assert "npz" in target_names() and "npz" in TARGETS
    model, inputs = tiny_mlp().eval(), _mlp_inputs()
    rows = export_all(model, inputs, tmp_path / "edge", ["npz"], fp16=True)
    assert [r["target"] for r in rows] == ["npz"] and rows[0]["info"] == {"outputs": ["output"], "fp16": True}
    assert rows[0]["path"] == str(tmp_path / "edge" / "model.npz") and rows[0]["bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "edge").iterdir()) == ["model.npz"]
    with torch.no_grad():
        want = model(inputs["input"]).numpy()
    with np.load(tmp_path / "edge" / "model.npz") as z:
        np.testing.assert_allclose(z["output"], want.astype(np.float16))


def test_cli_export_and_validate_a_registered_exporter(toys: dict[str, Exporter], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32))
    out = tmp_path / "edge"
    code, stdout, err = run_main(["export", MLP, "--to", "pt2", "--inputs", x, "-o", out, "--json"], capsys)
    assert code == 0, err
    assert [r["target"] for r in json.loads(stdout)["artifacts"]] == ["pt2"]
    report = tmp_path / "v.json"
    code, stdout, err = run_main(["validate", out / "model.pt2", "--reference", MLP, "--data", x, "--runs", "3",
                                  "--max-abs-error", "1e-5", "--json", report], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["runtime"] == "pt2" and rep["outputs"]["output"]["max_abs"] <= 1e-5 and rep["passed"]
    code, _, err = run_main(["validate", out / "model.pt2", "--reference", MLP, "--data", x, "--runtime", "torch"],
                            capsys)
    assert code == 2 and "--runtime torch cannot run a pt2 candidate; use --runtime pt2" in err
    code, _, err = run_main(["export", MLP, "--to", "tflite", "--inputs", x, "-o", tmp_path / "no"], capsys)
    assert code == 2 and "valid: onnx, ort, coreml, npz, pt2, opcount" in err


@needs_onnx
def test_export_all_chains_a_derived_exporter_after_onnx_and_int8(toys: dict[str, Exporter], tmp_path: Path) -> None:
    from lrcompress.edge.artifacts import export_all
    model, inputs = tiny_mlp().eval(), _mlp_inputs()
    rows = export_all(model, inputs, tmp_path / "a", ["opcount"])
    assert [r["target"] for r in rows] == ["opcount"] and rows[0]["info"]["from"] == "model.onnx"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.ops.json"]  # the ONNX was only a source
    rows = export_all(model, inputs, tmp_path / "b", ["opcount", "onnx"], quantize="int8")
    assert [r["target"] for r in rows] == ["onnx", "onnx-int8", "opcount"]
    assert rows[2]["info"]["from"] == "model.int8.onnx" and "MatMulInteger" in rows[2]["info"]["ops"]
    assert rows[1]["info"]["quantized_ops"] and rows[1]["info"]["bytes"] == rows[1]["bytes"]


# ------------------------------------------------------------------------------------------------ int8


@needs_onnx
def test_int8_returns_an_export_result(tmp_path: Path) -> None:
    model, inputs = tiny_mlp().eval(), _mlp_inputs()
    onnx_result = exporters.get_exporter("onnx").export_with_info(model, inputs, tmp_path / "m.onnx")
    res = exporters.quantize_int8(onnx_result.path, tmp_path / "q.onnx")
    assert isinstance(res, ExportResult) and res.path == tmp_path / "q.onnx" and res.info["quantized_ops"]
    int8 = exporters.get_exporter("int8")
    derived = int8.derive(onnx_result.path, tmp_path / int8.file_name("m"))
    assert isinstance(derived, ExportResult) and derived.path.name == "m.int8.onnx"
    assert derived.info["bytes"] < derived.info["source_bytes"]
    direct = int8.export_with_info(model, inputs, tmp_path / "d.onnx")
    assert isinstance(direct, ExportResult) and direct.info["int8"] and direct.info["quantization"]["quantized_ops"]
    feed = {"input": np.ones((3, 32), np.float32)}
    a, b = int8.load(derived.path, threads=1)(feed)["output"], int8.load(direct.path, threads=1)(feed)["output"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(BadInput, match="unknown option.*valid: op_types"):
        int8.derive(onnx_result.path, tmp_path / "x.onnx", opset=18)


# ------------------------------------------------------------------------------------------------ torch runner


def test_torch_runner_is_a_runner_and_matches_the_module() -> None:
    model = tiny_token_model().eval()
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1, 199, (3, 7)), "attention_mask": np.ones((3, 7), np.int64)}
    threads = torch.get_num_threads()
    runner = TorchRunner(model, threads=1)
    assert isinstance(runner, Runner) and runner.available_for_prediction and runner.input_names == []
    got = runner(feed)
    assert runner.output_names == ["output"] and torch.get_num_threads() == threads
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    np.testing.assert_array_equal(got["output"], want)
    mlp = tiny_mlp().eval()
    x = rng.standard_normal((4, 32)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(TorchRunner(mlp)({"input": x})["output"], mlp(torch.from_numpy(x)).numpy())
    with pytest.raises(BadInput, match="threads=0"):
        TorchRunner(mlp, threads=0)


def test_torch_runner_names_dict_outputs_like_the_exporters() -> None:
    class TwoHeads(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": x * 2, "hidden": (x + 1, x.sum(-1, keepdim=True))}

    out = TorchRunner(TwoHeads())({"input": np.ones((2, 3), np.float32)})
    assert list(out) == ["logits", "hidden_0", "hidden_1"] and out["hidden_1"].shape == (2, 1)


# ------------------------------------------------------------------------------------------------ comparison


def test_output_comparison_statistics_mask_and_non_finite() -> None:
    rng = np.random.default_rng(0)
    ref = {"h": rng.standard_normal((2, 4, 3)), "logits": rng.standard_normal((2, 5))}
    same = exporters.compare_outputs(ref, {k: v.copy() for k, v in ref.items()})
    assert same["h"]["max_abs"] == 0 and same["h"]["cos_mean"] == pytest.approx(1.0)
    assert same["logits"]["top1_agreement"] == 1.0 and "top1_agreement" not in same["h"]
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    cand = {"h": ref["h"].copy(), "logits": ref["logits"].copy()}
    cand["h"][0, 3] = np.nan  # a padding position: it does not count
    masked = exporters.compare_outputs(ref, cand, mask)
    assert masked["h"]["non_finite"] == 0 and masked["h"]["max_abs"] == 0
    cand["h"][1, 0, 0] = np.inf  # a real token: the example is broken
    acc = exporters.OutputComparison()
    assert acc.add(ref, cand, mask) == 1
    stats = acc.summary()["h"]
    assert stats["non_finite"] == 1 and stats["max_abs"] == np.inf and np.isnan(stats["cos_mean"])
    assert exporters.non_finite_examples(cand, mask) == {"h": 1, "logits": 0}
    with pytest.raises(BadInput, match="shape"):
        exporters.compare_outputs(ref, {"h": ref["h"][:1], "logits": ref["logits"]})


def test_lrcompress_drift_rules_stay_data_errors() -> None:
    from lrcompress.edge.drift import check_reference, common_outputs, compare
    from lrcompress.errors import DataError
    ref = {"output": np.ones((2, 3))}
    with pytest.raises(DataError, match="share no name"):
        common_outputs(ref, {"other": np.ones((2, 3))})
    with pytest.raises(DataError, match="not the same model"):
        compare(ref, {"output": np.ones((2, 4))}, None, exporters.OutputComparison())
    with pytest.raises(DataError, match="reference model produces NaN"):
        check_reference({"output": np.array([[1.0, np.nan, 0.0], [1.0, 1.0, 1.0]])}, None)


# ------------------------------------------------------------------------------------------------ Core ML view


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


class _Layer(nn.Module):
    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (h + attention_mask.squeeze(1).squeeze(1).unsqueeze(-1) * 0,)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(), _Layer()])


class BertLike(nn.Module):
    """The BERT layout coreml_view recognises (embeddings + encoder.layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()


def test_coreml_exporter_prepares_its_own_inputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import exporters.coreml_export as cm
    seen: dict[str, Any] = {}

    def fake_export(model: nn.Module, example_inputs: Any, path: Any, **options: Any) -> ExportResult:
        seen.update(model=model, inputs=example_inputs, options=options)
        return ExportResult(Path(path), {})

    monkeypatch.setattr(cm, "export_coreml", fake_export)
    monkeypatch.setattr(cm.CoreMLExporter, "requires", ())
    ids = torch.randint(1, 50, (2, 5))
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    exporters.get_exporter("coreml").export_with_info(BertLike(), inputs, tmp_path / "m.mlpackage", precision="fp32")
    assert isinstance(seen["model"], exporters.EncoderForCoreML) and list(seen["inputs"]) == ["input_ids",
                                                                                              "attention_mask"]
    assert seen["options"] == {"precision": "fp32"}
    plain = tiny_mlp()
    exporters.get_exporter("coreml").export_with_info(plain, _mlp_inputs(), tmp_path / "p.mlpackage")
    assert seen["model"] is plain  # anything else is converted as given
    from lrcompress.edge.artifacts import EncoderForCoreML, coreml_view  # the old import path still works
    assert EncoderForCoreML is exporters.EncoderForCoreML and coreml_view is exporters.coreml_view


def test_one_name_for_a_positional_input() -> None:
    """Data, calibration, export and validation call a single positional input the same."""
    from exporters.io_spec import SINGLE_INPUT
    from lrcompress.io.data import POSITIONAL
    assert POSITIONAL == SINGLE_INPUT
    import numpy as np
    import lrcompress as lc
    x = np.zeros((2, 3), np.float32)
    assert list(lc.TensorData({"": x}).arrays) == [POSITIONAL]  # the old spelling still works
    with pytest.raises(lc.LrcompressError, match="both"):
        lc.TensorData({"": x, POSITIONAL: x})
