"""lrcompress export: ONNX / ORT / Core ML artifacts from any source or compressed folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lrcompress
from tests.conftest import needs_minilm
from tests.test_bad_input import TOK, expect_user_error, run_main

exporters = pytest.importorskip("exporters")
pytest.importorskip("onnxruntime")


@pytest.fixture
def tok_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("export-inputs")
    ids = np.random.default_rng(0).integers(1, 199, (4, 12))
    p = d / "tok.npz"
    np.savez(p, input_ids=ids, attention_mask=np.ones_like(ids))
    return p


def _torch_out(model: torch.nn.Module, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()


def test_export_compressed_toy_all_targets(tmp_path, tok_inputs, capsys):
    ck = tmp_path / "ck"
    code, _, err = run_main(["compress", TOK, "--calib", tok_inputs, "--ratio", "0.4", "-o", ck, "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "edge"
    code, stdout, err = run_main(["export", ck, "--to", "onnx", "--to", "ort", "--to", "coreml", "--quantize", "int8",
                                  "--inputs", tok_inputs, "-o", out, "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert [r["target"] for r in rep["artifacts"]] == ["onnx", "onnx-int8", "ort", "coreml"]
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.mlpackage", "model.onnx", "model.ort"]
    for r in rep["artifacts"]:
        assert r["bytes"] > 0 and Path(r["path"]).exists()
    model, _ = lrcompress.load(ck)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 199, (3, 17))  # another batch and sequence length than the example
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    want = _torch_out(model, feed)
    onnx_run = exporters.ort_runner(out / "model.onnx", threads=1)
    got = next(iter(onnx_run(feed).values()))
    assert np.abs(got - want).max() <= 1e-4
    ort_run = exporters.ort_runner(out / "model.ort", threads=1)
    int8_run = exporters.ort_runner(out / "model.int8.onnx", threads=1)
    np.testing.assert_allclose(next(iter(ort_run(feed).values())), next(iter(int8_run(feed).values())), atol=1e-5)
    info = exporters.inspect_mlpackage(out / "model.mlpackage")
    assert info and "inputs" in info
    assert not exporters.get_exporter("coreml").load(out / "model.mlpackage").available_for_prediction


EXPORT_CASES = {
    "unknown-target": (["--to", "tflite"], ["--to tflite", "onnx, ort, coreml"]),
    "no-target": ([], ["no --to target", "--to onnx"]),
    "fp16-and-fp32": (["--to", "onnx", "--fp16", "--fp32"], ["--fp16 and --fp32"]),
    "quantize-int4": (["--to", "onnx", "--quantize", "int4"], ["--quantize 'int4'", "int8"]),
    "opset-11": (["--to", "onnx", "--opset", "11"], ["--opset 11", ">= 18"]),
    "no-inputs-no-tokenizer": (["--to", "onnx", "NOINPUTS"], ["no tokenizer", "--inputs FILE"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_bad_input(case, tmp_path, tok_inputs, capsys):
    extra, contains = EXPORT_CASES[case]
    argv = ["export", TOK, "-o", tmp_path / "out"] + [a for a in extra if a != "NOINPUTS"]
    if "NOINPUTS" not in extra:
        argv += ["--inputs", tok_inputs]
    expect_user_error(argv, capsys, tmp_path, contains)


def test_export_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    expect_user_error(["export", tmp_path / "junk", "--to", "onnx", "-o", tmp_path / "out"], capsys, tmp_path,
                      ["junk"])


@needs_minilm
@pytest.mark.slow
def test_export_compressed_minilm_onnx_matches_torch(tmp_path, capsys):
    from lrcompress.data import TextData, read_lines
    loaded = lrcompress.resolve("minilm")
    lines = read_lines(Path(__file__).resolve().parent.parent / "samples" / "calib.txt")[:32]
    cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=0.5, scope="model",
                                    probe_passes=0)
    small, rep = lrcompress.compress(loaded.model, cfg, TextData(lines, loaded.tokenizer, 64))
    ck = tmp_path / "ck"
    lrcompress.save(small, ck, loaded.spec, plan=rep.plan, side_files=loaded.side_files)
    out = tmp_path / "edge"
    code, _, err = run_main(["export", ck, "--to", "onnx", "--to", "ort", "-o", out, "-q"], capsys)
    assert code == 0, err
    model, tok = lrcompress.load(ck)
    enc = tok(lines[:3], padding=True, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in enc.items()}
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    for name in ("model.onnx", "model.ort"):
        run = exporters.ort_runner(out / name, threads=2)
        got = run(feed)["last_hidden_state"]
        assert np.abs(got - want).max() <= 1e-4, name
