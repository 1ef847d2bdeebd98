"""A torch module behind the Runner interface, so that the reference (or an uncompiled candidate) runs on named
numpy inputs and gives named numpy outputs exactly like an ONNX Runtime or Core ML artifact."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .errors import BadInput
from .io_spec import SINGLE_INPUT, call_options, flatten_outputs


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: as is), then restore the process-wide count."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchRunner:
    """A torch module as a :class:`~exporters.base.Runner`: named numpy inputs -> named numpy (float32) outputs,
    named as the exporters name them (``output`` for a plain tensor, dict / ModelOutput keys otherwise).

    A feed whose only name is ``input`` is passed positionally, any other by keyword. ``input_names`` is empty
    (the module takes what it is given); ``output_names`` is filled by the first call. ``threads``: torch's
    thread count during a call, restored after it. A Hugging Face decoder is called with ``use_cache=False``
    (logits, no KV cache), as it is exported.
    """

    available_for_prediction = True

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise BadInput(f"model is a {type(model).__name__}, not a torch.nn.Module; pass the module itself")
        if threads is not None and int(threads) < 1:
            raise BadInput(f"threads={threads} must be >= 1; pass a positive thread count")
        self.model = model.eval()
        self.threads = threads
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
        with torch_threads(self.threads), torch.no_grad():
            options = call_options(self.model)
            out = self.model(feed[SINGLE_INPUT], **options) if list(feed) == [SINGLE_INPUT] else self.model(**feed, **options)
        res = {k: v.detach().float().numpy() for k, v in flatten_outputs(out)}
        self.output_names = list(res)
        return res

    run = __call__
