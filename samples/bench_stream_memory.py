"""Memory and time of streaming compression on large-shaped checkpoints with random weights.

Random weights prove memory and speed, never accuracy. Each checkpoint is a Hugging Face
LLaMA folder written tensor by tensor in bfloat16 safetensors shards (one per block), never
held whole in memory:

- LLaMA-7B-shaped (hidden 4096, intermediate 11008, 32 heads, 8 key-value heads, vocabulary
  32000) with 2, 4 and 8 blocks: peak resident memory should be flat in the number of blocks;
- TinyLlama-1.1B-shaped (22 blocks, hidden 2048, intermediate 5632, 32 heads, 4 key-value
  heads, vocabulary 32000), compressed end to end.

Every run is ``lrcompress compress DIR --calib ids.npz --stream --ratio 0.5 --allocate uniform
--targets model.layers --max-memory 8G -o OUT`` in a fresh process on random token ids (the
embedding table and LM head are loaded, kept dense and written; the blocks are factorized; closed
loop, the default); the table gives that
process's peak resident memory (from the kernel, wait4), the peak per block (from the run's
report), seconds per block and the whole wall time.

Run from the repository root:  python samples/bench_stream_memory.py [--only 7b-2,7b-4,7b-8,tiny]
    [--workdir DIR] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
    "smoke": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2),
}
RUNS = {"7b-2": ("7b", 2), "7b-4": ("7b", 4), "7b-8": ("7b", 8), "tiny": ("tiny", 22), "tiny-2": ("tiny", 2),
        "tiny-4": ("tiny", 4), "smoke": ("smoke", 2)}
DEFAULT = "7b-2,7b-4,7b-8,tiny"


def write_checkpoint(folder: Path, shape: str, blocks: int, seed: int = 0) -> int:
    """A LLaMA folder with random bf16 weights, one shard per block; returns its bytes."""
    import transformers
    from safetensors.torch import save_file

    from lrcompress.streaming.weights import parameters_on_meta

    cfg = transformers.LlamaConfig(vocab_size=32000, num_hidden_layers=blocks, max_position_embeddings=2048,
                                   torch_dtype="bfloat16", architectures=["LlamaForCausalLM"], **SHAPES[shape])
    with parameters_on_meta():
        meta = transformers.LlamaForCausalLM(cfg)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    groups: dict[str, dict[str, tuple]] = {}
    for name, p in meta.named_parameters():
        part = name.split(".")
        key = f"block{int(part[2]):03d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = tuple(p.shape)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    files = sorted(groups)
    for i, key in enumerate(files, 1):
        fname = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        tensors = {}
        for name, shp in groups[key].items():
            if len(shp) == 1:  # norms
                tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return total


def run_one(folder: Path, calib: Path, out: Path, calibration: str) -> dict:
    cmd = [sys.executable, "-m", "lrcompress", "compress", str(folder), "--calib", str(calib), "--stream",
           "--ratio", "0.5", "--allocate", "uniform", "--targets", "model.layers", "--max-memory", "8G", "-o", str(out),
           "--calibration", calibration, "--json", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {stderr.decode()[-2000:]}")
    report = json.loads(stdout)
    return {"wall": wall, "peak_rss": usage.ru_maxrss * 1024, "report": report}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=DEFAULT, help=f"comma-separated subset of {', '.join(RUNS)} (smoke: a quick check)")
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp folder)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (sequences of 256)")
    ap.add_argument("--calibration", default="auto", help="--calibration of every run (auto = closed here)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_stream-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "ids.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, input_ids=rng.integers(2, 32000, size=(max(args.tokens // 256, 1), 256)).astype(np.int64))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"calibration {max(args.tokens // 256, 1)} x 256 random token ids")
    head = (f"{'model':<22} {'blocks':>6} {'ckpt GB':>8} {'peak RSS GB':>11} {'max block peak GB':>17} "
            f"{'s/block':>8} {'wall s':>7} {'kept':>6} {'loop':>6}")
    print(head)
    print("-" * len(head))
    for key in args.only.split(","):
        shape, blocks = RUNS[key]
        folder, out = work / key, work / f"{key}-out"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        size = write_checkpoint(folder, shape, blocks)
        r = run_one(folder, calib, out, args.calibration)
        stream = json.loads((out / "lrcompress.json").read_text())["plan"]["stream"]
        per_block = [u for u in stream["units"] if u["unit"].startswith("model.layers.")]
        spb = sum(u["seconds"] for u in per_block) / max(len(per_block), 1)
        block_peak = max(u["peak_rss"] for u in per_block)
        name = {"7b": "LLaMA-7B-shaped", "tiny": "TinyLlama-1.1B-shaped"}.get(shape, "small (smoke)")
        print(f"{name:<22} {blocks:>6} {size / 1e9:>8.2f} {r['peak_rss'] / 2**30:>11.2f} {block_peak / 2**30:>17.2f} "
              f"{spb:>8.1f} {r['wall']:>7.0f} {r['report']['totals']['ratio']:>6.3f} {stream['calibration']:>6}",
              flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    print("-" * len(head))
    print("peak RSS: whole process (kernel, wait4); max block peak: the largest per-block peak the run measured "
          "(VmHWM reset before each block); s/block: mean seconds per block (calibrate, plan, factorize, write); "
          "kept: parameters kept of the whole model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
