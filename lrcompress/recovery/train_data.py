"""Training and held-out data for recovery: seeded splits, fixed length-bucketed batches,
token-noise augmentation."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError
from ..io.data import Batch, TensorData, TextData

Data = TextData | TensorData


def split_data(data: Data, config: Any, eval_data: Data | None) -> tuple[Data, Data]:
    """Training and held-out data: ``eval_data`` when given, else a seeded
    ``eval_fraction`` of ``data`` that training never sees."""
    if eval_data is None:
        n = len(data)
        n_eval = max(1, round(n * config.eval_fraction))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
        train_idx, eval_idx = sorted(order[n_eval:]), sorted(order[:n_eval])
        data, eval_data = _subset(data, train_idx), _subset(data, eval_idx)
    if len(data) < config.batch_size:
        raise DataError(f"recovery has {len(data)} training examples, fewer than one batch (--batch-size "
                        f"{config.batch_size}); give more data or a smaller --batch-size")
    return data, eval_data


def _subset(data: Data, idx: list[int]) -> Data:
    if isinstance(data, TextData):
        return TextData([data.lines[i] for i in idx], data.tokenizer, data.max_length)
    return TensorData({k: a[idx] for k, a in data.arrays.items()}, data.source)


def fixed_batches(data: Data, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of each training batch: one seeded shuffle, then within runs of 8
    batches text is sorted by length (less padding per batch); full batches only."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    if isinstance(data, TextData):
        run = batch_size * 8
        order = [i for k in range(0, len(order), run)
                 for i in sorted(order[k:k + run], key=lambda j: (len(data.lines[j]), j))]
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def replace_tokens(batch: Batch, tokenizer: Any, share: float, seed: int) -> Batch:
    """Replace ``share`` of the real, non-special tokens by random vocabulary tokens."""
    ids = batch.inputs.get("input_ids")
    if ids is None or batch.mask is None:
        return batch
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []))), dtype=ids.dtype)
    pick = (torch.rand(ids.shape, generator=g) < share) & batch.mask & ~torch.isin(ids, special)
    vocab = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    new = torch.randint(0, vocab, ids.shape, generator=g, dtype=ids.dtype)
    new = torch.where(torch.isin(new, special), ids, new)
    return Batch({**batch.inputs, "input_ids": torch.where(pick, new, ids)}, batch.mask)


def make_batch(data: Data, idx: list[int]) -> Batch:
    return next(iter(_subset(data, idx).batches(len(idx))))
