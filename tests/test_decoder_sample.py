"""samples/train_decoder.py: a real, trained GPT-2-style decoder — a Hugging Face folder that reloads
as a causal LM with tied embeddings, has learned (held-out perplexity far below uniform and below
the untrained model), is deterministic, generates, is cached, and refuses bad input cleanly."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import decoder_fixture
from tests.decoder_fixture import SAMPLE, train_decoder_module

ROOT = SAMPLE.parent.parent
tiny_decoder = decoder_fixture.tiny_decoder  # the session fixture (conftest.py may provide it too)


@pytest.fixture(scope="module")
def td():
    return train_decoder_module()


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tok


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SAMPLE), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


# ------------------------------------------------------------------------------------------- the folder


def test_folder_reloads_as_gpt2_causal_lm_with_tied_embeddings(tiny_decoder: Path) -> None:
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "train.txt", "calib.txt", "heldout.txt", "decoder_build.json"):
        assert (tiny_decoder / name).is_file(), name
    config = json.loads((tiny_decoder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["tie_word_embeddings"] is True
    assert (config["n_layer"], config["n_embd"], config["n_positions"], config["vocab_size"]) == (2, 64, 64, 2048)

    model, tok = _load(tiny_decoder)
    assert type(model) is GPT2LMHeadModel
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one tensor
    with safe_open(str(tiny_decoder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # stored once
    # parameters counted once; blocks = 2 x (attention 4*64*64 + MLP 8*64*64 + biases 9*64 + 2 LayerNorms 4*64)
    total, blocks = train_decoder_module().param_counts(model)
    assert blocks == 2 * (12 * 64 * 64 + 13 * 64) == 99_968
    assert total == blocks + 2048 * 64 + 64 * 64 + 2 * 64 == 235_264

    assert tok.is_fast and len(tok) == 2048
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == tok.pad_token_id == 0
    line = (tiny_decoder / "heldout.txt").read_text().splitlines()[0]
    ids = tok(line + "\n")["input_ids"]
    assert 0 not in ids and tok.decode(ids) == line + "\n"  # byte-level: exact round trip, no special tokens
    assert len(ids) < len(line) / 2  # BPE merges, not bytes


def test_heldout_perplexity_is_learned_and_reproducible_from_the_folder(tiny_decoder: Path, td) -> None:
    info = td.read_build_info(tiny_decoder)
    m = info["metrics"]
    ppl, scored = td.folder_perplexity(tiny_decoder)
    assert ppl == pytest.approx(m["heldout_ppl"], rel=1e-6)  # the saved model is the one measured
    assert scored == m["heldout_scored"]
    n_windows = -(-m["heldout_tokens"] // 64)  # non-overlapping windows of 64, each scores all but its first
    assert scored == m["heldout_tokens"] - n_windows

    vocab = 2048
    untrained = td.init_model(td.get_preset("tiny"))
    model, tok = _load(tiny_decoder)
    ids = torch.tensor(tok((tiny_decoder / "heldout.txt").read_text())["input_ids"])
    untrained_ppl, _ = td.perplexity(untrained, ids, 64)
    assert untrained_ppl == pytest.approx(m["untrained_ppl"], rel=1e-6)
    assert 0.8 * vocab < untrained_ppl < 1.5 * vocab  # random init: about a uniform guess
    assert ppl < vocab / 5 and ppl < untrained_ppl / 5, (ppl, untrained_ppl)
    assert m["final_loss"] < m["first_loss"] - 2.0  # the loss fell from about ln(2048) = 7.6
    # overlapping windows score every token after the first; the lines are independent sentences, so
    # the extra context changes little (measured: 220.06 against 219.68)
    ppl_overlap, scored_overlap = td.perplexity(model, ids, 64, stride=16)
    assert scored_overlap == ids.numel() - 1 and ppl_overlap == pytest.approx(ppl, rel=0.05)


def test_perplexity_protocol_scores_each_token_once(td) -> None:
    for n, seq, stride in [(10, 4, 4), (11, 4, 2), (200, 64, 64), (200, 64, 17), (65, 64, 64)]:
        wins = td.score_windows(n, seq, stride)
        targets = [t for _, end, first in wins for t in range(first, end)]
        # each token once, in order; all after the first when windows overlap, all but each window's first
        # token when they do not (the first token of a window has no context in it)
        unscored = set(range(seq, n, seq)) if stride == seq else set()
        assert targets == sorted(set(range(1, n)) - unscored), (n, seq, stride)
        assert all(end - begin <= seq and begin < first for begin, end, first in wins)

    class Uniform(torch.nn.Module):  # equal logits: perplexity is exactly the vocabulary size
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 37)})()

    ids = torch.arange(300) % 37
    for stride, n_scored in ((50, 300 - 6), (13, 299)):  # non-overlapping: 6 windows, each first token unscored
        ppl, scored = td.perplexity(Uniform(), ids, 50, stride=stride)
        assert ppl == pytest.approx(37.0, rel=1e-12) and scored == n_scored
    with pytest.raises(ValueError, match="stride"):
        td.perplexity(Uniform(), ids, 50, stride=51)


# ------------------------------------------------------------------------------------------- data


def test_splits_are_disjoint_deterministic_and_written(tiny_decoder: Path, td) -> None:
    train, calib, heldout = td.decoder_splits()
    assert (len(calib), len(heldout)) == (256, 500) and len(train) > 10_000
    for split in (train, calib, heldout):
        assert len(set(split)) == len(split) and all(s and "\n" not in s for s in split)
    st, sc, sh = set(train), set(calib), set(heldout)
    assert not (st & sc) and not (st & sh) and not (sc & sh)
    assert td.decoder_splits() == (train, calib, heldout)
    # calibration and held-out text are the project's reference split (samples/calib.txt, samples/eval.txt)
    ref_calib, ref_heldout = td.decoder_text._pydoc_text().reference_split()
    assert calib == ref_calib and heldout == ref_heldout
    for name, lines in (("train", train), ("calib", calib), ("heldout", heldout)):
        assert (tiny_decoder / f"{name}.txt").read_text(encoding="utf-8") == "\n".join(lines) + "\n"
    counts = td.read_build_info(tiny_decoder)["splits"]
    assert counts == {"train": len(train), "calib": 256, "heldout": 500}


def test_tokenizer_is_trained_deterministically_on_training_text_only(td) -> None:
    train, _, heldout = td.decoder_splits()
    a = td.decoder_text.train_tokenizer(train, 512)
    b = td.decoder_text.train_tokenizer(train, 512)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 512
    c = td.decoder_text.train_tokenizer(heldout, 512)  # other text, other merges
    assert c.to_str() != a.to_str()


# ------------------------------------------------------------------------------------------- behaviour


def test_greedy_generation(tiny_decoder: Path) -> None:
    model, tok = _load(tiny_decoder)
    prompt = tok("Return the", return_tensors="pt")
    outs = [model.generate(**prompt, max_new_tokens=8, do_sample=False) for _ in range(2)]
    n = prompt["input_ids"].shape[1]
    assert outs[0].shape == (1, n + 8) and torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][0, :n], prompt["input_ids"][0])
    with torch.no_grad():  # greedy: the first new token is the argmax after the prompt
        first = model(**prompt).logits[0, -1].argmax()
    assert outs[0][0, n] == first
    text = tok.decode(outs[0][0])
    assert text.startswith("Return the") and len(text) > len("Return the")


def test_two_builds_are_identical(tiny_decoder: Path, tmp_path: Path, td) -> None:
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    other = td.build_decoder("tiny", tmp_path / "again", quiet=True)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)  # no global state left
    a, b = load_file(tiny_decoder / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_decoder / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    ia, ib = td.read_build_info(tiny_decoder), td.read_build_info(other)
    assert ia["fingerprint"] == ib["fingerprint"] and ia["build_id"] != ib["build_id"]
    assert ia["metrics"]["heldout_ppl"] == ib["metrics"]["heldout_ppl"]
    assert ia["metrics"]["final_loss"] == ib["metrics"]["final_loss"]


def test_cache_is_reused_and_a_failed_retrain_leaves_the_folder(tiny_decoder: Path, tmp_path: Path, td,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_decoder, folder)
    before = td.read_build_info(folder)["build_id"]
    weights = (folder / "model.safetensors").read_bytes()

    def no_training(*a, **k):
        raise RuntimeError("trained although the cache matches")

    monkeypatch.setattr(td, "train", no_training)
    assert td.build_decoder("tiny", folder) == folder  # reused: train() is never called
    assert "reusing" in capsys.readouterr().out
    assert td.read_build_info(folder)["build_id"] == before

    # retrain, or another preset (another fingerprint), trains again; a failure leaves the old folder
    changed = dataclasses.replace(td.get_preset("tiny"), steps=301)
    for kw in ({"preset": "tiny", "retrain": True}, {"preset": changed}):
        with pytest.raises(RuntimeError, match="trained although"):
            td.build_decoder(out=folder, quiet=True, **kw)
        assert td.read_build_info(folder)["build_id"] == before
        assert (folder / "model.safetensors").read_bytes() == weights
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary sibling left

    # a stale or damaged cache is not trusted
    (folder / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="trained although"):
        td.build_decoder("tiny", folder, quiet=True)


def test_script_reuses_the_cache(tiny_decoder: Path, tmp_path: Path, td) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_decoder, folder)
    done = _run("--preset", "tiny", "--out", str(folder))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"reusing {folder}") and "held-out perplexity" in done.stdout
    assert td.read_build_info(folder)["build_id"] == td.read_build_info(tiny_decoder)["build_id"]


@pytest.mark.parametrize("case", ["unknown preset", "out is a file", "out holds other files", "no --out"])
def test_script_bad_input_one_line_exit_2(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--out", str(out)]
    if case == "unknown preset":
        args[1] = "huge"
    elif case == "out is a file":
        out.write_text("keep me")
    elif case == "out holds other files":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        args = ["--preset", "tiny"]
    before = {str(p.relative_to(tmp_path)): (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
    done = _run(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    expected = {"unknown preset": "unknown preset 'huge'", "out is a file": "is an existing file",
                "out holds other files": "holds other files", "no --out": "--out"}[case]
    assert expected in lines[0]
    after = {str(p.relative_to(tmp_path)): (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
    assert after == before  # nothing written, nothing removed
