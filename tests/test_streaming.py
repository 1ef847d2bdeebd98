"""Block-sequential compression: closed-loop optimum, streaming = in-memory, resume, memory limit."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lrcompress.config import CompressConfig
from lrcompress.decompose import Metric, factorize, spectrum
from lrcompress.decompose.closed_loop import LoopStats, closed_factorize, output_error
from lrcompress.errors import ConfigError
from lrcompress.io.checkpoint import load
from lrcompress.io.data import TensorData, TextData, read_lines
from lrcompress.streaming.memory import parse_size
from lrcompress.workflow.blocks import compress_blocks, stream_compress
from lrcompress.streaming.writer import partial_folder
from lrcompress.workflow.pipeline import compress

transformers = pytest.importorskip("transformers")

V = 128


def _stats(n: int = 24, t: int = 400, noise: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    x_hat = x + noise * torch.randn(t, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return x, x_hat


def test_closed_loop_is_the_optimum_of_its_objective() -> None:
    x, x_hat = _stats()
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    st = LoopStats.zeros(24)
    st.add(x, x_hat)
    fit = closed_factorize(w, st, 5, blend=0.0, ridge=0.0)
    direct = float(torch.linalg.norm(x @ w.T - x_hat @ (fit.factors.a @ fit.factors.b).T) / torch.linalg.norm(x @ w.T))
    assert fit.closed_error == pytest.approx(direct, rel=1e-9)
    assert fit.error_ratio == pytest.approx(1.0, abs=1e-9)
    # brute force: the closed form beats the open-loop fit and random rank-5 perturbations of itself
    assert fit.closed_error <= fit.open_error if fit.open_error is not None else True
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        a = fit.factors.a + 0.05 * torch.randn(fit.factors.a.shape, generator=g, dtype=torch.float64)
        b = fit.factors.b + 0.05 * torch.randn(fit.factors.b.shape, generator=g, dtype=torch.float64)
        assert output_error(w, a @ b, st) >= fit.closed_error - 1e-12
    # the least-squares floor: nothing of rank <= 24 does better than W* = W C G^-1
    assert fit.floor <= fit.closed_error
    full = closed_factorize(w, st, 16, blend=0.0, ridge=0.0)
    assert full.closed_error == pytest.approx(fit.floor, abs=1e-9) or full.closed_error >= fit.floor


def test_closed_loop_beats_open_loop_on_the_actual_inputs() -> None:
    x, x_hat = _stats(noise=0.5)
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    st = LoopStats.zeros(24)
    st.add(x, x_hat)
    metric = Metric(gram=x.T @ x)
    f_open = factorize(w, spectrum(w, metric), 6, metric)
    fit = closed_factorize(w, st, 6, blend=0.0, ridge=1e-9, open_factors=(f_open.a, f_open.b))
    assert fit.open_error == pytest.approx(output_error(w, f_open.a @ f_open.b, st))
    assert fit.closed_error < fit.open_error


def test_closed_loop_reduces_to_open_loop() -> None:
    """X̂ = X (any blend) and blend = 1 (any X̂) are open-loop whitened SVD."""
    x, x_hat = _stats()
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    metric = Metric(gram=x.T @ x)
    f_open = factorize(w, spectrum(w, metric), 4, metric)
    for xh, blend in ((x, 0.0), (x, 0.5), (x_hat, 1.0)):
        st = LoopStats.zeros(24)
        st.add(x, xh)
        fit = closed_factorize(w, st, 4, blend=blend, ridge=0.0)
        assert torch.allclose(fit.factors.a @ fit.factors.b, f_open.a @ f_open.b, atol=1e-8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 3-block LLaMA (grouped-query attention) saved in several safetensors shards."""
    root = tmp_path_factory.mktemp("stream")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(root / "m", max_shard_size="60KB")
    np.savez(root / "ids.npz", input_ids=np.random.default_rng(0).integers(2, V, size=(48, 20)))
    return {"model": root / "m", "ids": root / "ids.npz"}


def _data(llama: dict[str, Path]) -> TensorData:
    return TensorData(dict(np.load(llama["ids"])))


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load(folder)
    return model.state_dict()


@pytest.mark.parametrize("budget", [dict(ratio=0.5, allocate="uniform"), dict(rank=8)])
def test_streaming_open_loop_equals_the_in_memory_path(llama: dict[str, Path], tmp_path: Path, budget: dict) -> None:
    assert len(list(llama["model"].glob("*.safetensors"))) > 3  # read from shards through the index
    cfg = CompressConfig(**budget)
    report = stream_compress(llama["model"], cfg, _data(llama), tmp_path / "out", batch_size=16)
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and (out / "report.json").is_file()
    assert not partial_folder(out).exists()
    base = transformers.LlamaForCausalLM.from_pretrained(str(llama["model"])).eval()
    ref, ref_report = compress(base, cfg, _data(llama), batch_size=16)
    got, want = _sd(out), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert report.params_after == ref_report.params_after and report.params_before == ref_report.params_before
    assert [lp.rank for lp in report.layers] == [lp.rank for lp in ref_report.layers]


def test_global_streaming_plan_spends_the_budget(llama: dict[str, Path], tmp_path: Path) -> None:
    cfg = CompressConfig(ratio=0.5)
    report = stream_compress(llama["model"], cfg, _data(llama), tmp_path / "out", batch_size=16)
    targets = [l for l in report.layers if l.kind == "linear" or l.kind == "embedding"]
    before = sum(l.params_before for l in targets if l.name in {x.name for x in report.layers})
    assert sum(l.params_after for l in report.layers) <= 0.5 * before + 1
    assert any(l.rank is not None for l in report.layers)
    model, _ = load(tmp_path / "out")
    x = torch.from_numpy(np.load(llama["ids"])["input_ids"][:2])
    assert torch.isfinite(model(input_ids=x).logits).all()


def test_interrupted_stream_resumes_to_the_same_result(llama: dict[str, Path], tmp_path: Path) -> None:
    cfg = CompressConfig(ratio=0.5, calibration="closed")
    whole = tmp_path / "whole"
    stream_compress(llama["model"], cfg, _data(llama), whole, batch_size=16)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_compress(llama["model"], cfg, _data(llama), out, batch_size=16, stop_after=2)
    part = partial_folder(out)
    assert part.is_dir() and not out.exists()
    assert json.loads((part / "state.json").read_text())["done"] == ["pre", "model.layers.0"]
    report = stream_compress(llama["model"], cfg, _data(llama), out, batch_size=16)
    assert report.plan["stream"]["resumed"] is True and not part.exists()
    a, b = _sd(whole), _sd(out)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_max_memory_below_the_need_is_refused_with_the_estimate(llama: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--max-memory .* below .* needs: .*raise --max-memory to at least"):
        stream_compress(llama["model"], CompressConfig(ratio=0.5), _data(llama), tmp_path / "out", max_memory=1 << 20)
    assert not (tmp_path / "out").exists()
    assert parse_size("1.5G") == int(1.5 * (1 << 30)) and parse_size("512MB") == 512 << 20


@pytest.fixture(scope="module")
def minilm_text(calib_txt: Path) -> tuple:
    from lrcompress.io.sources import resolve
    loaded = resolve("minilm")
    return loaded.model, TextData(read_lines(calib_txt)[:48], loaded.tokenizer, 64)


def test_closed_loop_output_error_is_below_open_loop_at_every_block(minilm_text: tuple) -> None:
    model, data = minilm_text
    reports = {}
    for mode in ("open", "closed"):
        m = copy.deepcopy(model)
        reports[mode] = compress_blocks(m, CompressConfig(ratio=0.5, allocate="uniform", calibration=mode,
                                                          closed_blend=0.0), data, batch_size=16)
    blocks = {mode: [u["output_error"] for u in r.plan["stream"]["units"] if u["unit"].startswith("encoder.layer.")]
              for mode, r in reports.items()}
    assert len(blocks["open"]) == 6
    for o, c in zip(blocks["open"], blocks["closed"]):
        assert c <= o
    assert blocks["closed"][-1] < 0.9 * blocks["open"][-1]
    loop = reports["closed"].plan["stream"]["loop"]
    assert len(loop) == 37  # 36 linear maps in the blocks + the pooler
    for name, f in loop.items():  # per layer, provably: the closed fit is best on the inputs it gets
        assert f["closed_error"] <= f["open_error"] + 1e-9, name
    closed = [l for l in reports["closed"].layers if l.name in loop]
    assert all(abs(l.error_ratio - 1.0) < 1e-3 for l in closed)


def test_closed_loop_refuses_what_it_cannot_do(minilm_text: tuple, llama: dict[str, Path], tmp_path: Path) -> None:
    model, data = minilm_text
    with pytest.raises(ConfigError, match="--method shared-svd"):
        compress(model, CompressConfig(method=_method("shared-svd"), ratio=0.5, calibration="closed"), data)
    with pytest.raises(ConfigError, match="--blocks 'nothing.here' matches 0"):
        compress(model, CompressConfig(ratio=0.5, calibration="closed", blocks="nothing.here"), data)
    with pytest.raises(ConfigError, match="--calibration closed"):
        compress(model, CompressConfig(method=_method("svd"), ratio=0.5, calibration="closed"), data)
    with pytest.raises(ConfigError, match="--calibration 'loop'"):
        CompressConfig(ratio=0.5, calibration="loop")
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def _method(name: str):
    from lrcompress.config import method_config
    return method_config(name)


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_closed_loop_on_causal_lms_with_a_cache(arch: str) -> None:
    """Causal LMs call their blocks with a key/value cache: every replay of a block runs without it."""
    torch.manual_seed(0)
    cfgs = {"gpt2": transformers.GPT2Config(vocab_size=V, n_layer=3, n_embd=32, n_head=4, n_positions=32),
            "opt": transformers.OPTConfig(vocab_size=V, num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                          ffn_dim=64, max_position_embeddings=32, word_embed_proj_dim=32, pad_token_id=1),
            "llama": transformers.LlamaConfig(vocab_size=V, num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)}
    model = transformers.AutoModelForCausalLM.from_config(cfgs[arch]).eval()
    data = TensorData({"input_ids": np.random.default_rng(1).integers(2, V, size=(24, 16))})
    errs = {}
    for mode in ("open", "closed"):
        small, rep = compress(model, CompressConfig(ratio=0.5, allocate="uniform", calibration=mode, closed_blend=0.0),
                              data, batch_size=8)
        errs[mode] = [u["output_error"] for u in rep.plan["stream"]["units"] if u["output_error"] is not None][-1] \
            if mode == "closed" else None
        x = torch.from_numpy(data.arrays["input_ids"][:2])
        assert torch.isfinite(small(input_ids=x).logits).all()
        assert small.generate(x[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)
    m = copy.deepcopy(model)
    open_rep = compress_blocks(m, CompressConfig(ratio=0.5, allocate="uniform", calibration="open"), data, batch_size=8)
    last_open = [u["output_error"] for u in open_rep.plan["stream"]["units"] if u["output_error"] is not None][-1]
    assert errs["closed"] <= last_open
