"""Entry points of block-sequential compression: on a model in memory (closed loop, returns the
compressed model) and streamed from a Hugging Face folder to a sharded output folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import ConfigError
from ..io.data import TensorData, TextData
from ..streaming.engine import Engine
from ..streaming.record import StreamResult
from ..streaming.weights import LazyCheckpoint
from ..streaming.writer import ShardWriter
from .report import CompressionReport, param_bytes


def _check_data(data: Any) -> None:
    if not isinstance(data, (TextData, TensorData)):
        raise ConfigError("block-by-block compression needs calibration data as TextData or TensorData "
                          "(--calib FILE); it runs the data through the model once per block")


def to_report(res: StreamResult, config: CompressConfig, params_before: int, params_after: int,
              bytes_before: int, bytes_after: int, closed: bool) -> CompressionReport:
    """The CompressionReport of a block-sequential run; ``plan['stream']`` adds the per-unit
    seconds, peak memory and output error, and the closed-loop figures by layer."""
    plan = res.plan.to_dict()
    plan["stream"] = {"units": res.units, "loop": res.loop, "peak_rss": res.peak_rss,
                      "calibration": "closed" if closed else "open", "requested": config.calibration}
    report = CompressionReport(layers=res.layers, params_before=params_before, params_after=params_after,
                               bytes_before=bytes_before, bytes_after=bytes_after, seconds=res.seconds,
                               calibration={"examples": res.examples, "tokens": res.tokens},
                               config=config.to_dict(), plan=plan)
    return report


def compress_blocks(model: nn.Module, config: CompressConfig, data: TextData | TensorData, *, plan: Any = None,
                    batch_size: int = 32, progress: Callable[[str, Any], None] | None = None) -> CompressionReport:
    """Compress ``model`` in place block by block (closed loop unless ``config.calibration`` is
    ``open``). ``plan``: the whole model's plan (``make_plan``), whose ranks and spectra every unit
    uses, as the in-memory path would; without it each unit is planned on its own statistics."""
    _check_data(data)
    before, bytes_before = sum(p.numel() for p in model.parameters()), param_bytes(model)
    engine = Engine(model, config, data, batch_size=batch_size, progress=progress, plan=plan)
    res = engine.run()
    return to_report(res, config, before, sum(p.numel() for p in model.parameters()), bytes_before, param_bytes(model),
                     engine.closed)


def fingerprint(folder: Path, config: CompressConfig, data: TextData | TensorData, batch_size: int) -> str:
    """What a resumed run must share with the interrupted one: the checkpoint files (names,
    sizes, times), the config, the calibration data and the batch size."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if isinstance(data, TextData):
        h.update(f"{data.max_length}".encode())
        for line in data.lines:
            h.update(line.encode() + b"\n")
    else:
        for k, a in sorted(data.arrays.items()):
            h.update(k.encode() + a.tobytes())
    h.update(str(batch_size).encode())
    return h.hexdigest()


def stream_compress(folder: str | Path, config: CompressConfig, data: TextData | TensorData, out: str | Path, *,
                    max_memory: int | None = None, batch_size: int = 32, overwrite: bool = False,
                    side_files: dict[str, Path] | None = None, progress: Callable[[str, Any], None] | None = None,
                    stop_after: int | None = None) -> CompressionReport:
    """Compress the Hugging Face folder ``folder`` one block at a time into ``out`` (sharded
    safetensors with an index, the manifest, config and tokenizer files). Only one block's
    weights are in memory at once; an interrupted run resumes from its last finished unit."""
    from ..io.checkpoint import FORMAT, MANIFEST, versions
    from ..io.sources import HF_SIDE_FILES
    from ..paths import check_output
    _check_data(data)
    folder, out = Path(folder), check_output(out, overwrite)
    lazy = LazyCheckpoint(folder)
    model = lazy.build()
    writer = ShardWriter(out, fingerprint(folder, config, data, batch_size))
    engine = Engine(model, config, data, lazy=lazy, writer=writer, batch_size=batch_size, max_memory=max_memory,
                    progress=progress, stop_after=stop_after)
    try:
        res = engine.run()
    except BaseException:
        writer.discard()  # kept for resuming only once a unit is done
        raise
    resumed = engine.resumed
    # everything outside the blocks that no unit wrote (norms, position tables, kept-dense layers)
    written = {k for keys in writer.state["shards"].values() for k in keys}
    rest: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in model.state_dict(keep_vars=False).items():
        owned = engine.block_paths + engine.pre + engine.post  # units wrote these themselves
        if k in written or any(k.startswith(p + ".") for p in owned) or t.device.type == "meta":
            continue
        if id(t) in seen or t.data_ptr() in seen:  # tied weights are stored once
            continue
        seen.update({id(t), t.data_ptr()})
        rest[k] = t
    if rest:
        writer.write_unit("rest", rest, {"results": [], "loop": {}, "unit": {}, "entries": {}, "plan": []})
    params_before = engine.params_model  # counted before any block changed
    params_after = params_before - sum(lp.params_before - lp.params_after for lp in res.plan.layers)
    size = 4  # written in float32, the compute dtype
    report = to_report(res, config, params_before, params_after, params_before * size, params_after * size,
                       engine.closed)
    report.plan["stream"]["resumed"] = resumed
    spec = {"kind": "hf", "class": type(model).__name__, "path": str(folder)}
    manifest = {"format": FORMAT, "source": spec, "versions": versions(), "layers": res.entries,
                "plan": report.plan}
    sides = {f: folder / f for f in HF_SIDE_FILES if (folder / f).is_file() and f != "config.json"}
    sides.update(side_files or {})
    report.source, report.output = str(folder), os.fspath(out)
    files = {MANIFEST: json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
             "config.json": (folder / "config.json").read_text(), "report.json": report.to_json() + "\n"}
    writer.finish(files, sides, overwrite)
    report.output = os.fspath(out)
    return report
