"""The text of the trained decoder (samples/train_decoder.py): three disjoint splits and its tokenizer.

Splits (:func:`decoder_splits`), all from samples/pydoc_text.py, all deterministic:

- held out (perplexity): the reference held-out sentences, pydoc topic sentences 1000-1499 of
  ``pydoc_text.sentences()`` (shuffled with random.Random(0)) — the lines of samples/eval.txt;
- calibration (compression): the reference calibration sentences, pydoc sentences 0-255 — the
  lines of samples/calib.txt;
- training: ``pydoc_text.large_training_text()`` (the other pydoc sentences plus the standard
  library's docstring sentences, shuffled with random.Random(1)) minus every calibration and
  held-out sentence and minus repeats (exact match after whitespace normalisation; the first
  occurrence is kept), in that order: 11,809 sentences, 1.08 M characters on Python 3.11.7.

So calibration and held-out text come from the same distribution (the language reference) and
neither is ever seen in training; the counts depend on the Python version (its bundled docs), the
split rule does not.

Tokenizer (:func:`train_tokenizer`): a byte-level BPE (the GPT-2 scheme: bytes mapped to
printable characters, no unknown token, no normalisation, no prefix space) trained with the
``tokenizers`` library on the training split only, with ``<|endoftext|>`` as its one special token
(eos = bos = unk = pad). Why not the MiniLM WordPiece tokenizer: its 30,522-entry vocabulary
would make the LM head (30,522 x 256 = 7.8 M weights) larger than all six decoder blocks together
(4.7 M) and the softmax would dominate training time on two cores; it also lower-cases and drops
newlines, so text would not round-trip. A 4,096-entry BPE fitted to this text gives about
4.0 characters per token (2,048 entries: 3.4) and keeps the head at 18 % of the model. Training
is deterministic (same input → the same merges, checked across processes) and takes a fraction
of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
EOS = "<|endoftext|>"
SPLIT_NAMES = ("train", "calib", "heldout")


@lru_cache(maxsize=1)
def _pydoc_text() -> ModuleType:
    """samples/pydoc_text.py loaded by path (sys.path is left as it is)."""
    spec = importlib.util.spec_from_file_location("_decoder_pydoc_text", HERE / "pydoc_text.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    pt = _pydoc_text()
    calib, heldout = pt.reference_split()
    seen = set(calib) | set(heldout)
    train = []
    for s in pt.large_training_text():  # it repeats the few sentences both sources hold: keep the first
        if s not in seen:
            seen.add(s)
            train.append(s)
    return tuple(train), tuple(calib), tuple(heldout)


def decoder_splits() -> tuple[list[str], list[str], list[str]]:
    """(training, calibration, held-out) sentences: pairwise disjoint, deterministic (see the module
    docstring). Fresh lists on every call; the work (about 2 s: the standard library is parsed) is
    done once per process."""
    train, calib, heldout = _splits()
    return list(train), list(calib), list(heldout)


def split_texts() -> dict[str, str]:
    """The three splits as the texts written to a decoder folder (``train.txt``, ``calib.txt``,
    ``heldout.txt``): one sentence a line, newline-terminated. Training and perplexity use these
    texts as they are (one token stream each)."""
    return {name: "\n".join(lines) + "\n" for name, lines in zip(SPLIT_NAMES, decoder_splits())}


def data_fingerprint(texts: dict[str, str]) -> str:
    """SHA-256 over the three split texts (names included): the data part of the cache key."""
    h = hashlib.sha256()
    for name in SPLIT_NAMES:
        h.update(name.encode())
        h.update(b"\0")
        h.update(texts[name].encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def train_tokenizer(train_lines: list[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (``<|endoftext|>`` is id
    0) trained on ``train_lines`` only. Encoding adds no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_lines, trainer=trainer)
    return tok


def hf_tokenizer(tok: Any, max_length: int) -> Any:
    """``tok`` wrapped as transformers' fast GPT-2 tokenizer (eos = bos = unk = pad =
    ``<|endoftext|>``), ready for ``save_pretrained``; AutoTokenizer loads the saved folder back as
    the same class."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                             model_max_length=max_length, add_prefix_space=False)
