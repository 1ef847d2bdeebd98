"""Decoder language models (issue 13): GPT-2 (transformers' Conv1D, fused c_attn), LLaMA with
grouped-query attention, Qwen2, OPT (learned positions with their own forward), Phi and
GPT-NeoX (fused query_key_value), each built from a small config with random weights and pushed
through compress -> save -> load -> generate -> export ONNX -> validate on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lrcompress as lc
from lrcompress.methods.kinds import is_linear, layer_matrix
from lrcompress.methods.layers import LowRankEmbedding, LowRankLinear
from tests.conftest import run_main
from tests.decoder_fixture import tiny_decoder  # noqa: F401  (the trained tiny decoder, built once per session)

transformers = pytest.importorskip("transformers")

V, POS = 128, 64
ARCHS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, n_positions=POS)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                          num_key_value_heads=2, intermediate_size=128,
                                                          max_position_embeddings=POS)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128,
                                                      max_position_embeddings=POS)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                                max_position_embeddings=POS, word_embed_proj_dim=64, pad_token_id=1)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                intermediate_size=128, max_position_embeddings=POS)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                             intermediate_size=128, max_position_embeddings=POS)),
}


def _ids(n: int = 32, t: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, V, size=(n, t)).astype(np.int64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture saved as a Hugging Face folder (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for name, (config_cls, model_cls, kw) in ARCHS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(vocab_size=V, bos_token_id=0, eos_token_id=0, **kw)
        model = getattr(transformers, model_cls)(config).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    np.savez(root / "calib.npz", input_ids=_ids())
    np.savez(root / "held.npz", input_ids=_ids(8, 16, seed=1))
    out["calib"], out["held"] = root / "calib.npz", root / "held.npz"
    return out


def _linear_maps(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if is_linear(m)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_decoder_round_trip(arch: str, folders: dict[str, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    src = lc.resolve(str(folders[arch]))
    assert type(src.model).__name__ == ARCHS[arch][1]  # loaded with its LM head
    data = lc.TensorData({"input_ids": _ids()})
    small, rep = lc.compress(src.model, lc.CompressConfig(ratio=0.6, scope="model", probe_passes=0), data)
    planned = {l.name for l in rep.layers}
    assert _linear_maps(src.model) <= planned  # every linear map is planned (factorized or dense with a reason)
    blocks = [l for l in rep.layers if ".0." in l.name or ".1." in l.name]
    assert sum(l.rank is not None for l in blocks) >= len(blocks) // 2  # the decoder blocks are compressed
    assert all(l.reason for l in rep.layers if l.rank is None)
    for l in rep.layers:
        if l.rank is not None:
            assert l.error_ratio == pytest.approx(1.0, abs=1e-3)  # whitened SVD: the proven optimum
            assert isinstance(small.get_submodule(l.name), (LowRankLinear, LowRankEmbedding))
    lc.save(small, tmp_path / "ck", src.spec, plan=rep.plan, side_files=src.side_files)
    again, _ = lc.load(tmp_path / "ck")
    assert type(again) is type(src.model)
    x = torch.from_numpy(_ids(2, 12, seed=2))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, small(x).logits, rtol=0, atol=0)
    gen = again.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9) and torch.equal(gen[0, :5], x[0, :5])
    out = tmp_path / "edge"
    code, _, err = run_main(["export", tmp_path / "ck", "--to", "onnx", "--inputs", folders["calib"], "-o", out, "-q"],
                            capsys)
    assert code == 0, err
    code, stdout, err = run_main(["validate", out / "model.onnx", "--reference", tmp_path / "ck", "--data",
                                  folders["held"], "--runs", "3", "--max-cosine-drift", "1e-4"], capsys)
    assert code == 0, err + stdout  # ONNX Runtime reproduces the compressed torch model


def test_gpt2_conv1d_is_factorized_in_its_transposed_layout(folders: dict[str, Path]) -> None:
    """transformers' Conv1D stores W as (in, out): the matrix view, the Gram (inputs of size
    in) and the factorized Linear pair must all agree with y = x W + b."""
    src = lc.resolve(str(folders["gpt2"]))
    c_fc = src.model.transformer.h[0].mlp.c_fc
    assert tuple(c_fc.weight.shape) == (64, 256) and tuple(layer_matrix(c_fc).shape) == (256, 64)
    data = lc.TensorData({"input_ids": _ids()})
    cfg = lc.CompressConfig(rank=64, targets=("transformer.h.0.mlp.c_fc",), probe_passes=0)
    small, rep = lc.compress(src.model, cfg, data)
    (lay,) = rep.layers
    assert lay.shape == (256, 64) and lay.rank is None  # rank 64 = full rank: dense, never past break-even
    small, rep = lc.compress(src.model, lc.CompressConfig(rank=8, targets=("transformer.h.0.mlp.c_fc",)), data)
    new = small.transformer.h[0].mlp.c_fc
    assert isinstance(new, LowRankLinear) and (new.in_features, new.out_features) == (64, 256)
    # the whitened optimum on the calibration inputs, computed independently
    x = []
    hook = c_fc.register_forward_pre_hook(lambda m, a: x.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        src.model(torch.from_numpy(_ids()))
    hook.remove()
    X = torch.cat(x).detach().double()
    Y = X @ c_fc.weight.detach().double()
    u, s, vh = torch.linalg.svd(Y, full_matrices=False)
    best = float(s[8:].square().sum().sqrt() / s.square().sum().sqrt())
    with torch.no_grad():
        got = X.float() @ new.first.weight.T @ new.second.weight.T
    achieved = float((got.double() - Y).norm() / Y.norm())
    assert rep.layers[0].relative_error == pytest.approx(best, rel=1e-4)
    assert achieved == pytest.approx(best, rel=1e-3)


def test_unsupported_linear_modules_are_listed_not_skipped() -> None:
    """A module holding a weight matrix that no method takes (nn.Conv1d, a positional
    embedding with its own forward, nn.MultiheadAttention) is planned dense with its type."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(8, 16, 3)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).transpose(1, 2)
            return self.fc(self.attn(h, h, h)[0])

    model = Odd().eval()
    small, rep = lc.compress(model, lc.CompressConfig(method=lc.method_config("svd"), rank=2))
    by = {l.name: l for l in rep.layers}
    assert set(by) == {"conv", "attn", "fc"}  # attn.out_proj is read by attn's forward: never swapped alone
    assert by["conv"].kind == "unsupported" and "unsupported type Conv1d" in by["conv"].reason
    assert "unsupported type MultiheadAttention" in by["attn"].reason and by["attn"].rank is None
    assert by["fc"].rank == 2
    x = torch.randn(2, 8, 10)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    report = lc.inspect(model)  # plain SVD spectra, no data
    assert any(r.name == "conv" and "unsupported type Conv1d" in r.note for r in report.layers)


@pytest.mark.parametrize("method", ["svd", "tt", "shared-svd"])
def test_gpt2_conv1d_under_every_linear_method(method: str, folders: dict[str, Path], tmp_path: Path) -> None:
    """Plain SVD, tensor-train and shared bases take Conv1D like nn.Linear (with measured
    sensitivities: the probes write the factorized weight back in Conv1D's layout); the
    folder reloads with the embedding and LM head still tied and counted once."""
    src = lc.resolve(str(folders["gpt2"]))
    data = lc.TensorData({"input_ids": _ids()})
    budget = {"rank": 2} if method == "tt" else {"ratio": 0.5}  # TT at half the params costs more MACs than dense
    cfg = lc.CompressConfig(method=lc.method_config(method), targets=("transformer.h",), **budget)
    small, rep = lc.compress(src.model, cfg, data)
    taken = [l for l in rep.layers if l.rank is not None]
    assert taken and all(l.method == method for l in taken)
    if method == "shared-svd":
        assert all(l.error_ratio == pytest.approx(1.0, abs=1e-3) for l in taken)
    lc.save(small, tmp_path / "ck", src.spec, plan=rep.plan, side_files=src.side_files)
    again, _ = lc.load(tmp_path / "ck")
    assert again.lm_head.weight is again.transformer.wte.weight
    assert sum(p.numel() for p in again.parameters()) == rep.params_after
    x = torch.from_numpy(_ids(2, 10, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, small(x).logits, rtol=0, atol=0)


def test_targets_naming_only_an_unsupported_module_is_refused(folders: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import expect_user_error
    expect_user_error(["compress", folders["opt"], "--calib", folders["calib"], "--ratio", "0.5", "--targets",
                       "model.decoder.embed_positions", "-o", tmp_path / "out"], capsys, tmp_path,
                      ["embed_positions", "unsupported type OPTLearnedPositionalEmbedding", "Conv1D"])


def test_max_length_fits_a_small_decoder(tiny_decoder: Path, tmp_path: Path,  # noqa: F811
                                         capsys: pytest.CaptureFixture) -> None:
    """The default --max-length (128) is lowered to a 64-position decoder's limit; a value the
    user gives beyond it is refused in one line."""
    from tests.conftest import expect_user_error
    code, _, err = run_main(["compress", tiny_decoder, "--calib", tiny_decoder / "calib.txt", "--ratio", "0.8",
                             "--targets", "transformer.h", "--calib-samples", "32", "-o", tmp_path / "ck", "-q"], capsys)
    assert code == 0, err
    again, _ = lc.load(tmp_path / "ck")
    assert type(again).__name__ == "GPT2LMHeadModel"
    expect_user_error(["compress", tiny_decoder, "--calib", tiny_decoder / "calib.txt", "--max-length", "100",
                       "--ratio", "0.8", "-o", tmp_path / "out"], capsys, tmp_path,
                      ["--max-length 100", "64 positions", "n_positions"])
