"""CLI: ``lrcompress eval``: sliding-window perplexity of causal LMs side by side (original vs compressed vs exported)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, SourceError
from .common import StageBars, check_paths, cli, parse_number, show_progress

RUNTIME_SUFFIXES = (".onnx", ".ort")  # artifacts eval runs on ONNX Runtime


@cli.command("eval")
@click.argument("sources", nargs=-1, required=True)
@click.option("--ppl", "ppl_path", required=True, metavar="FILE",
              help="Text to score: a UTF-8 file read whole and tokenized once as one stream (e.g. the WikiText-2 "
                   "raw test split), or token ids (.npz with input_ids; rows joined, padding dropped).")
@click.option("--seq-len", type=str, default=None, metavar="N",
              help="Window in tokens. Default: the fewest positions any source's config allows (n_positions / "
                   "max_position_embeddings), at most 1024; needed when every source is an .onnx/.ort file.")
@click.option("--stride", type=str, default=None, metavar="N",
              help="Tokens between window starts, in [1, --seq-len]. Default: --seq-len (non-overlapping windows, each "
                   "scoring seq-len - 1 tokens), the protocol of the published WikiText-2 tables (GPTQ, SVD-LLM, "
                   "ASVD), so numbers compare with them. A smaller stride (e.g. seq-len/2) gives each scored token "
                   "more context, which lowers perplexity, at seq-len/stride times the compute.")
@click.option("--max-tokens", type=str, default=None, metavar="N", help="Score only the first N tokens of the text (quick runs).")
@click.option("--tokenizer", "tokenizer_path", type=str, default=None, metavar="FOLDER",
              help="Folder with the tokenizer (default: the first source that has one; .onnx/.ort files have none).")
@click.option("--threads", type=int, default=None, metavar="N", help="Threads for torch and ONNX Runtime (default: their own).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled module (runs code from the file).")
@click.option("--trust-code", is_flag=True,
              help="Allow a compressed folder to rebuild its architecture by running the factory code it names.")
@click.option("--json", "json_file", type=str, default=None, metavar="FILE", help="Also write the report as JSON to FILE ('-': stdout).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
@click.option("-q", "--quiet", is_flag=True)
def eval_(sources: tuple[str, ...], ppl_path: str, seq_len: str | None, stride: str | None, max_tokens: str | None,
          tokenizer_path: str | None, threads: int | None, trust_pickle: bool, trust_code: bool,
          json_file: str | None, overwrite: bool, quiet: bool) -> None:
    """Perplexity of SOURCE(s) on a text, side by side; the first SOURCE is the reference.

    SOURCE: any model source (a Hugging Face causal-LM folder, a folder written by lrcompress compress, a
    factory) or an .onnx/.ort file exported from a causal LM. Prints, per model, the perplexity, its ratio to
    the first's, next-token top-1 agreement with the first, tokens scored and seconds."""
    from ..edge.perplexity import check_window_options, perplexity, read_text, text_tokens
    from ..io.data import TENSOR_SUFFIXES
    from ..paths import write_text

    n_seq = parse_number("--seq-len", seq_len, int)
    n_stride = parse_number("--stride", stride, int)
    n_max = parse_number("--max-tokens", max_tokens, int)
    check_window_options(n_seq, n_stride)  # the rules that need no model, before anything loads
    if n_max is not None and n_max < 3:
        raise ConfigError(f"--max-tokens {n_max} must be an integer >= 3; e.g. --max-tokens 100000")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1; e.g. --threads 2")
    torch_sources = [s for s in sources if not s.lower().endswith(RUNTIME_SUFFIXES)]
    check_paths(inputs=[ppl_path, tokenizer_path, *[s for s in sources if s not in torch_sources]],
                sources=torch_sources, files={"--json": json_file}, overwrite=overwrite)
    if Path(ppl_path).suffix.lower() not in TENSOR_SUFFIXES:
        read_text(ppl_path)  # missing, binary or empty text: refused before any model loads
    models, tokenizer = _load(sources, threads, trust_pickle, trust_code)
    if tokenizer_path is not None:
        tokenizer = _tokenizer(tokenizer_path)
    tokens = text_tokens(ppl_path, tokenizer)
    show = show_progress(quiet, json_file == "-")
    progress = StageBars(show)

    try:
        report = perplexity(models, tokens, seq_len=n_seq, stride=n_stride, max_tokens=n_max, text=repr(ppl_path),
                            threads=threads, progress=progress)
    finally:
        progress.close()
    out = report.to_dict() | {"text": ppl_path}
    if json_file == "-":
        click.echo(json.dumps(out, indent=2))
        return
    if json_file is not None:
        write_text(json_file, json.dumps(out, indent=2) + "\n")
    if not quiet:
        click.echo(report.table())


def _load(sources: tuple[str, ...], threads: int | None, trust_pickle: bool,
          trust_code: bool) -> tuple[dict[str, Any], Any]:
    """Each SOURCE as a model for perplexity (name -> torch module or ONNX Runtime runner), checked to be a causal
    LM as it loads, and the first tokenizer among them."""
    import exporters

    from ..edge.lm import TorchLM, as_language_model
    from ..io.sources import resolve

    models: dict[str, Any] = {}
    tokenizer, first = None, ""
    for source in sources:
        name = source if source not in models else f"{source} #{len(models) + 1}"
        if source.lower().endswith(RUNTIME_SUFFIXES):
            if not Path(source).is_file():
                raise SourceError(f"{source!r} does not exist or is not a file; pass an .onnx/.ort file exported from a "
                                  "causal LM (lrcompress export FOLDER --to onnx --to ort)")
            models[name] = as_language_model(exporters.exporter_for_path(source).load(source, threads=threads), name)
            continue
        if source.lower().endswith(".mlpackage"):
            raise SourceError(f"{source!r} is a Core ML package; eval runs torch models and .onnx/.ort files (ONNX "
                              "Runtime): pass the model's folder or its ONNX export")
        loaded = resolve(source, trust_pickle=trust_pickle, trust_code=trust_code)
        models[name] = TorchLM(loaded.model, name, threads)  # refuses a model without an LM head now
        if loaded.tokenizer is not None:
            if tokenizer is None:
                tokenizer, first = loaded.tokenizer, source
            elif loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
                raise SourceError(f"{source!r} and {first!r} have different tokenizers: their perplexities count "
                                  "different tokens and do not compare; compare models that share a tokenizer")
    return models, tokenizer


def _tokenizer(folder: str) -> Any:
    from ..io.architecture import quiet_hf
    p = Path(folder)
    if not p.is_dir():
        raise SourceError(f"--tokenizer {folder!r} is not a folder; pass the model folder that holds tokenizer.json / "
                          "tokenizer_config.json")
    try:
        from transformers import AutoTokenizer
        with quiet_hf():
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a folder without a tokenizer
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"--tokenizer {folder!r} holds no loadable tokenizer ({msg[:160]}); pass the model folder "
                          "that holds tokenizer.json / tokenizer_config.json") from None
