"""The Core ML exporter's input preparation: a Hugging Face BERT-style encoder is converted through a wrapper that
builds the additive attention mask itself (transformers' mask helpers use ops coremltools cannot convert)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ENCODER_INPUTS = ("input_ids", "attention_mask")


class EncoderForCoreML(nn.Module):
    """A Hugging Face BERT-style encoder as embeddings + layers with an explicit additive
    mask: the library's mask helpers use ops coremltools cannot convert (``new_ones``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether ``model`` has the BERT layout (``embeddings`` and ``encoder.layer``)."""
        return hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.model.embeddings(input_ids=input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -1e4  # fits fp16 compute
        for layer in self.model.encoder.layer:
            out = layer(h, attention_mask=mask)
            h = out[0] if isinstance(out, tuple) else out
        return {"last_hidden_state": h}


def coreml_view(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any]:
    """The module and inputs to hand to coremltools: a BERT-style encoder given ``input_ids`` and
    ``attention_mask`` by name gets the wrapper and those two inputs; anything else is returned as is."""
    if isinstance(inputs, Mapping) and EncoderForCoreML.applies(model) and set(ENCODER_INPUTS) <= set(inputs):
        return EncoderForCoreML(model).eval(), {k: inputs[k] for k in ENCODER_INPUTS}
    return model, inputs
