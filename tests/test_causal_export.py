"""Export of causal LMs (issue 13): a Hugging Face decoder exports to ONNX and ORT as ``input_ids`` (+ ``attention_mask``)
-> ``logits`` with dynamic batch and sequence and no KV cache, and ONNX Runtime follows torch at another batch size
and sequence length (relative L2 < 1e-4 in fp32). GPT-2 (and its compressed folder) through the CLI, LLaMA with
grouped-query attention through the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SAMPLES, run_main
from tests.test_perplexity import (  # noqa: F401  (_one_thread and tokenizer are fixtures shared with it)
    POS, VOCAB, _one_thread, gpt2, llama, save_folder, tokenizer)

transformers = pytest.importorskip("transformers")
exporters = pytest.importorskip("exporters")
pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4  # relative L2 of the logits, ONNX Runtime vs torch, fp32




def _batch(batch: int, seq: int, seed: int = 3) -> dict[str, np.ndarray]:
    """Token ids with the first row right-padded (its last 3 positions masked)."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_on_runtime(path: Path, model: torch.nn.Module, batch: int = 3, seq: int = 9) -> float:
    """Run the artifact at (batch, seq), compare its logits with torch's; returns the relative L2 error."""
    runner = exporters.ort_runner(path, threads=1)
    assert runner.input_names == ["input_ids", "attention_mask"] and runner.output_names == ["logits"]
    feed = _batch(batch, seq)
    got = runner(feed)["logits"]
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()
    assert got.shape == want.shape == (batch, seq, VOCAB)
    err = _rel_l2(got, want)
    assert err < TOLERANCE, err
    return err


def check_graph(path: Path, positions: int = POS) -> None:
    """Inputs input_ids / attention_mask with symbolic batch and sequence, one output logits; position limit stored."""
    info = exporters.inspect_onnx(path)
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask"]
    assert all(i["shape"] == ["batch", "sequence"] and i["dtype"] == "int64" for i in info["inputs"])
    assert [o["name"] for o in info["outputs"]] == ["logits"]
    assert info["outputs"][0]["shape"][-1] == VOCAB
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["max_positions"] == str(positions)


def _export_cli(folder: Path, out: Path, capsys: pytest.CaptureFixture) -> list[dict]:
    code, stdout, err = run_main(["export", folder, "--to", "onnx", "--to", "ort", "-o", out, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(stdout)["artifacts"]
    assert [r["target"] for r in rows] == ["onnx", "ort"]
    onnx_info = rows[0]["info"]
    assert onnx_info["exporter"] == "dynamo" and onnx_info["output_check"] == "passed"
    assert onnx_info["dynamic_check"]["status"] == "passed" and onnx_info["dynamic_check"]["rel_l2"] < TOLERANCE
    assert onnx_info["metadata"]["architecture"] == "GPT2LMHeadModel"
    return rows


def test_gpt2_folder_exports_to_onnx_and_ort(tokenizer: object, tmp_path: Path,  # noqa: F811
                                             capsys: pytest.CaptureFixture) -> None:
    model = gpt2(0)
    folder = save_folder(model, tokenizer, tmp_path / "gpt2")
    _export_cli(folder, tmp_path / "export", capsys)
    check_graph(tmp_path / "export" / "model.onnx")
    for name in ("model.onnx", "model.ort"):
        check_on_runtime(tmp_path / "export" / name, model, batch=3, seq=9)
        check_on_runtime(tmp_path / "export" / name, model, batch=1, seq=POS)  # the longest window


def test_compressed_gpt2_folder_exports_to_onnx_and_ort(tokenizer: object, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture) -> None:
    import lrcompress as lc

    folder = save_folder(gpt2(0), tokenizer, tmp_path / "gpt2")
    src = lc.resolve(str(folder))
    data = lc.TextData((SAMPLES / "calib.txt").read_text().splitlines()[:64], src.tokenizer, max_length=POS)
    small, report = lc.compress(src.model, lc.CompressConfig(ratio=0.6, scope="model", probe_passes=0), data)
    assert any(layer.rank is not None for layer in report.layers)
    lc.save(small, tmp_path / "small", src.spec, plan=report.plan, side_files=src.side_files)
    reloaded, _ = lc.load(tmp_path / "small")
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    rows = _export_cli(tmp_path / "small", tmp_path / "export", capsys)
    check_graph(tmp_path / "export" / "model.onnx")
    dense = exporters.export_onnx(src.model, {"input_ids": torch.ones(1, 8, dtype=torch.long)}, tmp_path / "dense.onnx")
    assert rows[0]["bytes"] < dense.path.stat().st_size  # the low-rank factors are in the graph
    for name in ("model.onnx", "model.ort"):
        check_on_runtime(tmp_path / "export" / name, reloaded)


def test_llama_with_grouped_query_attention_exports_without_token_types(tmp_path: Path) -> None:
    from lrcompress.edge.artifacts import export_all

    model = llama(0)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    rows = export_all(model, inputs, tmp_path / "export", ["onnx", "ort"])  # a tokenizer may give token types
    info = rows[0]["info"]
    assert info["input_names"] == ["input_ids", "attention_mask"] and info["output_names"] == ["logits"]
    assert info["dynamic_check"]["status"] == "passed" and info["metadata"]["architecture"] == "LlamaForCausalLM"
    check_graph(tmp_path / "export" / "model.onnx")
    for name in ("model.onnx", "model.ort"):
        check_on_runtime(tmp_path / "export" / name, model, batch=3, seq=9)
        check_on_runtime(tmp_path / "export" / name, model, batch=2, seq=20)


def test_decoders_run_without_kv_cache_in_torch_and_exported() -> None:
    from exporters.io_spec import call_options, prepare

    model = gpt2(0)
    assert call_options(model) == {"use_cache": False}
    feed = {k: v for k, v in _batch(2, 6).items()}
    out = exporters.TorchRunner(model, threads=1)(feed)
    assert list(out) == ["logits"]  # no cache among the outputs the reference is compared on
    _, spec = prepare(model, {k: torch.from_numpy(v) for k, v in feed.items()})
    assert spec.output_names == ["logits"]
    assert call_options(torch.nn.Linear(2, 2)) == {}
