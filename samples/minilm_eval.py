"""Embedding-drift metrics for sentence encoders: mean-pooled, L2-normalized embeddings."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], max_length: int = 128,
          batch_size: int = 64) -> torch.Tensor:
    """Normalized mean-pooled last hidden states (the all-MiniLM-L6-v2 sentence embedding)."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def drift(ref: torch.Tensor, cand: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Cosine (mean, worst) between paired embeddings and the overlap of k-NN sets."""
    cos = (ref * cand).sum(-1)
    def knn(e: torch.Tensor) -> torch.Tensor:
        s = e @ e.T
        s.fill_diagonal_(-float("inf"))
        return s.topk(k, dim=-1).indices
    a, b = knn(ref), knn(cand)
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)])
    return {"cos_mean": float(cos.mean()), "cos_worst": float(cos.min()), "nn10": float(overlap.mean())}
