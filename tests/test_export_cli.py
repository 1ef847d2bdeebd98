"""lrcompress export: ONNX / ORT / Core ML artifacts from any source or compressed folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lrcompress
from tests.conftest import needs_minilm
from tests.conftest import TOK, expect_user_error, run_main, trusted

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
    model, _ = lrcompress.load(ck, trust_code=True)
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
    "quantize-int3": (["--to", "onnx", "--quantize", "int3"], ["--quantize 'int3'", "int8", "int4"]),
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
def test_export_compressed_minilm_onnx_matches_torch(tmp_path, capsys):
    from lrcompress.io.data import TextData, read_lines
    loaded = lrcompress.resolve("minilm")
    lines = read_lines(Path(__file__).resolve().parent.parent / "samples" / "calib.txt")[:32]
    cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=0.5, scope="model",
                                    probe_passes=0)
    small, rep = lrcompress.compress(loaded.model, cfg, TextData(lines, loaded.tokenizer, 64))
    ck = tmp_path / "ck"
    lrcompress.save(small, ck, loaded.spec, plan=rep.plan, side_files=loaded.side_files)
    out = tmp_path / "edge"
    code, _, err = run_main(["export", ck, "--to", "onnx", "--to", "ort", "--to", "coreml", "-o", out, "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.mlpackage", "model.onnx", "model.ort"]
    held = tmp_path / "held.txt"
    held.write_text("\n".join(lines[:4]) + "\n")
    f = tmp_path / "cm.json"
    code, stdout, err = run_main(["validate", out / "model.mlpackage", "--reference", "minilm", "--data", held,
                                  "--max-cosine-drift", "0.1", "--json", f], capsys)
    assert code == 0, err
    cm = json.loads(f.read_text())
    assert cm["status"] == "skipped: Core ML prediction needs macOS" and cm["gates"][0]["status"] == "skipped"
    assert [o["name"] for o in cm["structure"]["outputs"]] == ["last_hidden_state"]
    model, tok = lrcompress.load(ck, trust_code=True)
    enc = tok(lines[:3], padding=True, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in enc.items()}
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    for name in ("model.onnx", "model.ort"):
        run = exporters.ort_runner(out / name, threads=2)
        got = run(feed)["last_hidden_state"]
        assert np.abs(got - want).max() <= 1e-4, name


# ---------------------------------------------------------------- validate


@pytest.fixture
def edge(tmp_path_factory: pytest.TempPathFactory, tok_inputs: Path) -> Path:
    """A compressed toy folder and its .onnx/.ort/.int8/.mlpackage, outside each test's tmp_path."""
    d = tmp_path_factory.mktemp("edge")
    from lrcompress.cli import main
    for argv in (["compress", TOK, "--calib", tok_inputs, "--ratio", "0.5", "-o", d / "ck", "-q"],
                 ["export", d / "ck", "--to", "onnx", "--to", "ort", "--to", "coreml", "--quantize", "int8",
                  "--inputs", tok_inputs, "-o", d / "edge", "-q"]):
        with pytest.raises(SystemExit) as exc:
            main(trusted(argv))
        assert exc.value.code in (0, None)
    return d


@pytest.mark.parametrize("cand", ["ck", "edge/model.onnx", "edge/model.ort", "edge/model.int8.onnx"])
def test_validate_reports_drift_latency_and_honours_gates(cand, edge, tok_inputs, tmp_path, capsys):
    report = tmp_path / "v.json"
    base = ["validate", edge / cand, "--reference", TOK, "--data", tok_inputs, "--runs", "10", "--json", report]
    code, stdout, err = run_main(base + ["--max-cosine-drift", "0.2", "--max-size-ratio", "1.0"], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    out = rep["outputs"]["output"]
    assert 0.5 < out["cos_mean"] < 0.9999 and out["examples"] == 4 and out["max_abs"] > 0
    assert rep["runtime"] == ("torch" if cand == "ck" else "onnxruntime")
    for who in ("reference", "candidate"):
        lat = rep["latency"][who]
        assert lat["runs"] == 10 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert rep["sizes"]["candidate"] < rep["sizes"]["reference"]
    assert [g["status"] for g in rep["gates"]] == ["passed", "passed"] and rep["passed"]
    assert "cos mean" in stdout and "p50" in stdout
    # a gate the candidate cannot meet: exit 1, named with the amount
    code, stdout, err = run_main(base + ["--max-cosine-drift", "0.0001", "--overwrite"], capsys)
    assert code == 1
    assert "max_cosine_drift" in err and "vs limit 0.0001" in err
    assert json.loads(report.read_text())["gates"][0]["status"] == "failed"


def test_validate_compressed_folder_on_onnxruntime_matches_torch_drift(edge, tok_inputs, tmp_path, capsys):
    threads = torch.get_num_threads()
    reps = {}
    for rt in ("torch", "onnxruntime"):
        f = tmp_path / f"{rt}.json"
        code, _, err = run_main(["validate", edge / "ck", "--reference", TOK, "--data", tok_inputs, "--runtime", rt,
                                 "--runs", "5", "--json", f, "-q"], capsys)
        assert code == 0, err
        reps[rt] = json.loads(f.read_text())["outputs"]["output"]
    assert reps["torch"]["cos_mean"] == pytest.approx(reps["onnxruntime"]["cos_mean"], abs=1e-5)
    assert torch.get_num_threads() == threads  # --threads 1 did not leak into the process


def test_validate_mlpackage_is_skipped_never_passed(edge, tok_inputs, tmp_path, capsys):
    import platform
    if platform.system() == "Darwin":
        pytest.skip("on macOS Core ML predicts; this checks the Linux behaviour")
    f = tmp_path / "c.json"
    code, stdout, err = run_main(["validate", edge / "edge" / "model.mlpackage", "--reference", TOK, "--data",
                                  tok_inputs, "--max-cosine-drift", "0.01", "--json", f], capsys)
    assert code == 0, err
    rep = json.loads(f.read_text())
    assert rep["status"] == "skipped: Core ML prediction needs macOS"
    assert rep["gates"][0]["status"] == "skipped" and "passed" not in {g["status"] for g in rep["gates"]}
    assert [i["name"] for i in rep["structure"]["inputs"]] == ["input_ids", "attention_mask"]
    assert rep["structure"]["weight_bytes"] > 0 and rep["outputs"] == {}
    assert "skipped: Core ML prediction needs macOS" in stdout


VALIDATE_CASES = {
    "negative-gate": (["--max-cosine-drift", "-0.1"], ["--max-cosine-drift -0.1", "in [0, 2]"]),
    "nan-gate": (["--max-abs-error", "nan"], ["--max-abs-error", "finite"]),
    "top1-above-one": (["--min-top1-agreement", "1.5"], ["--min-top1-agreement 1.5", "[0, 1]"]),
    "threads-zero": (["--threads", "0"], ["--threads 0", ">= 1"]),
    "runtime-mismatch": (["--runtime", "coreml"], ["--runtime coreml", "torch or onnxruntime"]),
    "unknown-runtime": (["--runtime", "tflite"], ["--runtime 'tflite'", "torch, onnxruntime, coreml"]),
}


@pytest.mark.parametrize("case", sorted(VALIDATE_CASES))
def test_validate_bad_input(case, edge, tok_inputs, tmp_path, capsys):
    extra, contains = VALIDATE_CASES[case]
    cand = edge / "ck"
    if case == "unknown-runtime":
        cand = edge / "edge" / "model.onnx"
    expect_user_error(["validate", cand, "--reference", TOK, "--data", tok_inputs, *extra], capsys, tmp_path, contains)


def test_validate_corrupt_artifacts_and_wrong_data(edge, tok_inputs, tmp_path, capsys):
    bad = tmp_path.parent / f"{tmp_path.name}-bad"
    bad.mkdir()
    for name in ("m.onnx", "m.ort"):
        (bad / name).write_bytes(b"\x00garbage" * 10)
        expect_user_error(["validate", bad / name, "--reference", TOK, "--data", tok_inputs], capsys, tmp_path,
                          [name])
    (bad / "m.mlpackage").mkdir()
    (bad / "m.mlpackage" / "Manifest.json").write_text("{not json")
    expect_user_error(["validate", bad / "m.mlpackage", "--reference", TOK, "--data", tok_inputs], capsys, tmp_path,
                      ["m.mlpackage"])
    wrong = bad / "x.npy"  # one positional float array for a model that takes token ids by name
    np.save(wrong, np.zeros((4, 32), np.float32))
    expect_user_error(["validate", edge / "edge" / "model.onnx", "--reference", TOK, "--data", wrong], capsys,
                      tmp_path, ["needs inputs", "input_ids"])
    expect_user_error(["validate", bad / "nothing.onnx", "--reference", TOK, "--data", tok_inputs], capsys, tmp_path,
                      ["does not exist"])


@needs_minilm
def test_validate_minilm_onnx_and_ort_on_held_out_text(tmp_path, capsys):
    from lrcompress.io.data import TextData, read_lines
    root = Path(__file__).resolve().parent.parent / "samples"
    loaded = lrcompress.resolve("minilm")
    lines = read_lines(root / "calib.txt")[:32]
    cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=0.75, scope="model",
                                    probe_passes=0)
    small, rep = lrcompress.compress(loaded.model, cfg, TextData(lines, loaded.tokenizer, 64))
    ck = tmp_path / "ck"
    lrcompress.save(small, ck, loaded.spec, plan=rep.plan, side_files=loaded.side_files)
    code, _, err = run_main(["export", ck, "--to", "onnx", "--to", "ort", "-o", tmp_path / "edge", "-q"], capsys)
    assert code == 0, err
    held = tmp_path / "held.txt"
    held.write_text("\n".join(read_lines(root / "eval.txt")[:24]) + "\n")
    for name in ("model.onnx", "model.ort"):
        f = tmp_path / f"{name}.json"
        code, stdout, err = run_main(["validate", tmp_path / "edge" / name, "--reference", "minilm", "--data", held,
                                      "--max-length", "64", "--runs", "5", "--max-cosine-drift", "0.2",
                                      "--json", f], capsys)
        assert code == 0, err
        out = json.loads(f.read_text())["outputs"]["last_hidden_state"]
        assert 0.8 < out["cos_mean"] < 1.0 and out["examples"] == 24


def test_export_unsupported_op_names_op_and_layer(tmp_path, capsys):
    x = tmp_path.parent / f"{tmp_path.name}-x.npy"
    np.save(x, np.zeros((2, 8), np.float32))
    for target in ("onnx", "coreml"):
        expect_user_error(["export", "tests.odd_models:odd_net", "--to", target, "--inputs", x, "-o",
                           tmp_path / "out"], capsys, tmp_path, ["cli_no_export_op", "StrangeBlock"])


def test_export_missing_dependency_names_the_extra(tmp_path, tok_inputs, capsys, monkeypatch):
    import exporters.base
    real = exporters.base.is_importable
    monkeypatch.setattr(exporters.base, "is_importable", lambda m: False if m == "onnxruntime" else real(m))
    expect_user_error(["export", TOK, "--to", "ort", "--inputs", tok_inputs, "-o", tmp_path / "out"], capsys,
                      tmp_path, ["onnxruntime is not installed", "pip install 'lrcompress[onnx]'"])


def test_bert_encoder_coreml_view_matches_and_converts(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("coremltools")
    from lrcompress.edge.artifacts import EncoderForCoreML, coreml_view, export_all
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
    view, view_inputs = coreml_view(bert, inputs)
    assert isinstance(view, EncoderForCoreML) and list(view_inputs) == ["input_ids", "attention_mask"]
    with torch.no_grad():
        want = bert(**inputs).last_hidden_state
        got = view(**view_inputs)["last_hidden_state"]
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    rows = export_all(bert, inputs, tmp_path / "edge", ["coreml"])
    info = exporters.inspect_mlpackage(tmp_path / "edge" / "model.mlpackage")
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask"]
    assert [o["name"] for o in info["outputs"]] == ["last_hidden_state"] and rows[0]["bytes"] > 0
