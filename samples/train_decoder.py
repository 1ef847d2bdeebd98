"""A small GPT-2-style causal language model, trained here and deterministically: a real decoder to
compress and to measure by perplexity (no causal-LM checkpoint can be downloaded).

    python samples/train_decoder.py --preset full --out DIR [--retrain] [--quiet]
    python samples/train_decoder.py --preset tiny --out DIR      # a few seconds: for tests

From Python: ``build_decoder(preset, out, retrain=False) -> Path`` (benchmarks and the
``tiny_decoder`` test fixture call it).

The folder is a plain Hugging Face folder: ``config.json`` (``GPT2LMHeadModel``, input embedding
and LM head tied), ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json`` (AutoTokenizer loads it as the fast GPT-2 tokenizer, eos = pad =
``<|endoftext|>``). It also holds the three text splits by path (``train.txt``, ``calib.txt``,
``heldout.txt``; see samples/decoder_text.py for the split rule and the tokenizer choice) and
``decoder_build.json``: the preset, the cache fingerprint and the measured figures.

Model and training: transformers' own ``GPT2LMHeadModel`` from a ``GPT2Config`` (dropout 0: a few
epochs on a million characters underfit, they do not overfit), initialised from the seed. AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up then cosine decay to a tenth
of the peak learning rate, gradient norm clipped at 1. Batches are windows of ``n_positions``
tokens cut from the training text as one token stream, at a seeded random offset each epoch, in
seeded random order. Matrix products run under bfloat16 autocast (weights, optimizer state and
every evaluation stay float32): twice the speed on this CPU (a full-preset step of 16 x 128
tokens: 417 vs 880 ms). One torch thread, set in a scoped context and restored: on this shared
two-core machine one thread was measured faster than two (a 2048x256x1024 matmul: 107 vs 47
GFLOP/s; that training step 880 ms vs 1.2-2.8 s), and the thread count is part of what makes a
run reproducible. For the same 1.43 M training tokens, 1,400 steps of 8 windows reached a lower
held-out perplexity than 700 steps of 16 (80.3 vs 86.8 in a trial run; a peak learning rate of
3e-3 instead of 2e-3 gave 86.4 at 16).

Measured on this machine (torch 2.13 CPU, Python 3.11.7; ``time python samples/train_decoder.py
--preset P --out DIR``):

    preset  layers x width, heads, ctx, vocab  params (in blocks)     train   command  final loss  held-out ppl
    full    6 x 256, 4, 128, 4096              5,820,416 (4,738,560)  301 s   316 s    4.1493      81.79
    tiny    2 x 64, 2, 64, 2048                  235,264 (99,968)       6.6 s  16.5 s   5.2388     202.85

(untrained: 4311 and 2082; a uniform guess: the vocabulary size).

A second ``--retrain`` of ``full`` gave bit-identical weights (training 296.5 s that time).

Held-out perplexity: ``heldout.txt`` (one sentence a line) tokenized whole as one stream,
non-overlapping windows of ``n_positions`` tokens (stride = window, the protocol of the GPTQ /
SVD-LLM / ASVD tables); in each window every token after the first is scored from the tokens
before it in that window; exp of the mean negative log-likelihood, accumulated in float64. It is
the figure ``lrcompress eval DIR --ppl DIR/heldout.txt --seq-len N --stride N`` computes.

Caching: the fingerprint hashes the preset (architecture and training settings), the trainer
version and the three split texts. A folder that already holds a model with the same
fingerprint is reused (and says so) unless ``retrain``; anything else is built in a temporary
sibling and renamed into place, so an error or an interrupt leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from lrcompress.errors import ConfigError, LrcompressError, OutputError, TrainingError
from lrcompress.edge.perplexity import windows
from lrcompress.io.architecture import quiet_hf
from lrcompress.paths import atomic_folder
from lrcompress.scoped import torch_threads

HERE = Path(__file__).resolve().parent
TRAINER_VERSION = 1  # bump when the training code changes what a preset produces
BUILD_FILE = "decoder_build.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "train.txt", "calib.txt", "heldout.txt")


def _load_text_module() -> ModuleType:
    """samples/decoder_text.py loaded by path (sys.path is left as it is)."""
    spec = importlib.util.spec_from_file_location("_decoder_text", HERE / "decoder_text.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


decoder_text = _load_text_module()
decoder_splits = decoder_text.decoder_splits


@dataclass(frozen=True)
class Preset:
    """Architecture and training settings; every field is part of the cache fingerprint."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1
    bf16: bool = True

    def fingerprint(self, data: str) -> str:
        blob = json.dumps({"trainer": TRAINER_VERSION, "preset": dataclasses.asdict(self), "data": data},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


PRESETS = {
    "full": Preset("full", n_layer=6, n_embd=256, n_head=4, n_positions=128, vocab_size=4096,
                   batch_size=8, steps=1400, lr=2e-3, warmup=100),
    "tiny": Preset("tiny", n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=2048,
                   batch_size=16, steps=300, lr=5e-3, warmup=20),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))} "
                          "(e.g. --preset tiny for a model that trains in seconds)")
    return PRESETS[preset]


# ---------------------------------------------------------------------------------------------- model


def make_config(p: Preset) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=p.vocab_size, n_positions=p.n_positions, n_embd=p.n_embd, n_layer=p.n_layer,
                      n_head=p.n_head, n_inner=4 * p.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                      architectures=["GPT2LMHeadModel"])


def init_model(p: Preset, config: Any | None = None) -> Any:
    """``GPT2LMHeadModel`` with the preset's architecture, initialised from its seed (the global RNG
    state is left untouched). Untrained: the baseline the trained model is measured against."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]), quiet_hf():
        torch.manual_seed(p.seed)
        model = GPT2LMHeadModel(config if config is not None else make_config(p))
    model.generation_config.pad_token_id = 0
    model.loss_type = "ForCausalLM"  # what the default resolves to, said explicitly (transformers warns otherwise)
    return model


def param_counts(model: Any) -> tuple[int, int]:
    """(all parameters, the tied embedding/head counted once; those in the decoder blocks)."""
    total = sum(t.numel() for t in model.parameters())
    blocks = sum(t.numel() for t in model.transformer.h.parameters())
    return total, blocks


# ---------------------------------------------------------------------------------------------- perplexity


score_windows = windows  # the window plan of lrcompress's perplexity (lrcompress/edge/perplexity.py)


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seq_len: int, stride: int | None = None,
               batch_size: int = 32, threads: int | None = 1) -> tuple[float, int]:
    """(perplexity, scored tokens) of ``model`` on the 1-D token stream ``ids``: sliding windows of
    ``seq_len`` tokens every ``stride`` (default ``seq_len``: non-overlapping), float32 forward,
    log-softmax and sums in float64. ``threads`` torch threads meanwhile (restored after; None: as
    set): on this machine a tiny model's forward took 16 ms on one thread and 408 ms on two. The
    model is put back in the mode it was in."""
    stride = seq_len if stride is None else stride
    if ids.numel() < seq_len + 1 or not 1 <= stride <= seq_len:
        raise ConfigError(f"perplexity needs a stride in [1, {seq_len}] and more than {seq_len} tokens "
                          f"(got stride {stride}, {ids.numel()} tokens)")
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    wins = score_windows(ids.numel(), seq_len, stride)
    try:
        with torch_threads(threads):
            i = 0
            while i < len(wins):  # windows of one length go in one batch
                length = wins[i][1] - wins[i][0]
                group = [w for w in wins[i:i + batch_size] if w[1] - w[0] == length]
                x = torch.stack([ids[b:e] for b, e, _ in group])
                logits = model(input_ids=x).logits.double()
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
                for row, (b, e, first) in enumerate(group):
                    nll -= float(logp[row, first - b - 1:].sum())
                    scored += e - first
                i += len(group)
    finally:
        model.train(was_training)
    return math.exp(nll / scored), scored


def folder_perplexity(folder: str | Path, text_file: str = "heldout.txt") -> tuple[float, int]:
    """Perplexity of a saved decoder folder on one of its text files, loaded back through
    AutoModelForCausalLM / AutoTokenizer (``local_files_only``), windows of ``n_positions``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ids = torch.tensor(tok((folder / text_file).read_text(encoding="utf-8"))["input_ids"])
    return perplexity(model, ids, model.config.n_positions)


# ---------------------------------------------------------------------------------------------- training


def _lr_at(p: Preset, step: int) -> float:
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    t = (step - p.warmup) / max(p.steps - p.warmup, 1)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _batches(ids: torch.Tensor, p: Preset, gen: torch.Generator):
    """Endless (B, n_positions) batches: per epoch a random offset, windows in random order."""
    n = p.n_positions
    while True:
        offset = int(torch.randint(0, n, (1,), generator=gen))
        k = (ids.numel() - offset) // n
        windows = ids[offset:offset + k * n].view(k, n)
        order = torch.randperm(k, generator=gen)
        for i in range(0, k - p.batch_size + 1, p.batch_size):
            yield windows[order[i:i + p.batch_size]]


def train(model: Any, ids: torch.Tensor, p: Preset, progress: Callable[[str], None] | None = None) -> list[float]:
    """Train ``model`` in place on the token stream ``ids`` for ``p.steps`` steps; the loss of each
    step. The caller sets the thread count."""
    if ids.numel() < p.n_positions * p.batch_size + p.n_positions:
        raise ConfigError(f"training text of {ids.numel()} tokens is shorter than one batch of "
                          f"{p.batch_size} x {p.n_positions}")
    decay = [t for t in model.parameters() if t.dim() >= 2]
    rest = [t for t in model.parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=p.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(p.seed)
    batches = _batches(ids, p, gen)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(p.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(p, step)
        x = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise TrainingError(f"training diverged at step {step} (loss {losses[-1]}); nothing was written: "
                                "lower the preset's lr")
        if progress is not None and ((step + 1) % max(p.steps // 10, 1) == 0 or step + 1 == p.steps):
            progress(f"step {step + 1}/{p.steps}  loss {losses[-1]:.4f}  lr {_lr_at(p, step):.2e}  "
                     f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- build


def read_build_info(folder: str | Path) -> dict[str, Any] | None:
    """``decoder_build.json`` of a decoder folder, or None when it is missing or unreadable."""
    try:
        info = json.loads((Path(folder) / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _reusable(out: Path, fingerprint: str) -> dict[str, Any] | None:
    info = read_build_info(out)
    if info is None or info.get("fingerprint") != fingerprint:
        return None
    return info if all((out / f).is_file() for f in MODEL_FILES) else None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is an existing file; give a folder path (new, empty, or a decoder "
                          "folder this script wrote)")
    if out.is_dir() and any(out.iterdir()) and read_build_info(out) is None:
        raise OutputError(f"--out {str(out)!r} is a folder that holds other files and no {BUILD_FILE}; "
                          "give a new or empty folder (this script replaces only folders it wrote)")


def summary(info: dict[str, Any]) -> str:
    """The figures of a build, as printed."""
    p, m = info["preset"], info["metrics"]
    lines = [
        (f"decoder {p['name']!r}: GPT2LMHeadModel, {p['n_layer']} layers, width {p['n_embd']}, {p['n_head']} heads, "
         f"context {p['n_positions']}, vocabulary {p['vocab_size']} (byte-level BPE)"),
        (f"parameters: {m['params_total']:,} total (tied embedding/head counted once), "
         f"{m['params_blocks']:,} in the decoder blocks"),
        (f"training: {p['steps']} steps x {p['batch_size']} x {p['n_positions']} tokens = "
         f"{m['tokens_seen']:,} tokens ({m['epochs']:.1f} epochs of {m['train_tokens']:,}), "
         f"{p['threads']} thread(s), {'bf16 autocast' if p['bf16'] else 'float32'}: {m['train_seconds']:.1f} s "
         f"(build {m['build_seconds']:.1f} s)"),
        f"final training loss: {m['final_loss']:.4f} (mean of the last {m['final_loss_steps']} steps)",
        (f"held-out perplexity: {m['heldout_ppl']:.4f} (untrained {m['untrained_ppl']:.1f}, uniform "
         f"{p['vocab_size']}) on heldout.txt: {m['heldout_tokens']:,} tokens, non-overlapping windows of "
         f"{p['n_positions']}, {m['heldout_scored']:,} tokens scored"),
    ]
    return "\n".join(lines)


def build_decoder(preset: str | Preset, out: str | Path, retrain: bool = False, quiet: bool = False) -> Path:
    """Train the preset into the folder ``out`` (or reuse the model already there when it was built
    with the same preset, trainer and data) and return ``out``. Prints the figures unless ``quiet``.
    Raises a ConfigError for an unknown preset and an OutputError for an ``out`` that cannot be
    (re)written, before any work."""
    p = get_preset(preset)
    out = Path(out)
    _check_out(out)
    say: Callable[[str], None] = (lambda s: None) if quiet else print
    texts = decoder_text.split_texts()
    fingerprint = p.fingerprint(decoder_text.data_fingerprint(texts))
    if not retrain:
        info = _reusable(out, fingerprint)
        if info is not None:
            say(f"reusing {out}: trained before with preset {p.name!r} and the same config and data "
                f"(fingerprint {fingerprint[:12]}); pass --retrain to train again")
            say(summary(info))
            return out
        old = read_build_info(out)
        if old is not None:
            say(f"{out} holds a decoder built with other settings, data or trainer (preset "
                f"{old.get('preset', {}).get('name')!r}); training it again")
    t_build = time.perf_counter()
    progress = None if quiet or not sys.stderr.isatty() else (lambda s: print(s, file=sys.stderr, flush=True))
    with atomic_folder(out, overwrite=True) as tmp, torch_threads(p.threads):
        train_lines = texts["train"].splitlines()
        tok = decoder_text.train_tokenizer(train_lines, p.vocab_size)
        train_ids = torch.tensor(tok.encode(texts["train"]).ids, dtype=torch.long)
        held_ids = torch.tensor(tok.encode(texts["heldout"]).ids, dtype=torch.long)
        model = init_model(p)
        untrained_ppl, _ = perplexity(model, held_ids, p.n_positions)
        t0 = time.perf_counter()
        losses = train(model, train_ids, p, progress)
        train_seconds = time.perf_counter() - t0
        ppl, scored = perplexity(model, held_ids, p.n_positions)
        total, blocks = param_counts(model)
        tail = max(p.steps // 10, 1)
        with quiet_hf():
            model.save_pretrained(tmp)
            decoder_text.hf_tokenizer(tok, p.n_positions).save_pretrained(tmp)
        for name, text in texts.items():
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
        import tokenizers
        import transformers

        info = {
            "build_id": secrets.token_hex(8),
            "fingerprint": fingerprint,
            "trainer_version": TRAINER_VERSION,
            "preset": dataclasses.asdict(p),
            "metrics": {
                "params_total": total, "params_blocks": blocks,
                "train_tokens": train_ids.numel(), "tokens_seen": p.steps * p.batch_size * p.n_positions,
                "epochs": p.steps * p.batch_size * p.n_positions / train_ids.numel(),
                "train_seconds": round(train_seconds, 2),
                "build_seconds": round(time.perf_counter() - t_build, 2),
                "final_loss": sum(losses[-tail:]) / tail, "final_loss_steps": tail,
                "first_loss": losses[0],
                "heldout_ppl": ppl, "heldout_tokens": held_ids.numel(), "heldout_scored": scored,
                "untrained_ppl": untrained_ppl,
                "ppl_protocol": f"non-overlapping windows of {p.n_positions} tokens over heldout.txt as one stream",
            },
            "splits": {name: len(text.splitlines()) for name, text in texts.items()},
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        }
        (tmp / BUILD_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    say(summary(info))
    say(f"wrote {out}")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse prints usage too)
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", help=f"one of {', '.join(sorted(PRESETS))} (default full)")
    ap.add_argument("--out", required=True, help="folder for the model, tokenizer and text splits")
    ap.add_argument("--retrain", action="store_true", help="train even when --out holds the same model")
    ap.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = ap.parse_args(argv)
    try:
        build_decoder(args.preset, args.out, retrain=args.retrain, quiet=args.quiet)
    except LrcompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
