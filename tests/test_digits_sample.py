"""samples/digits_cnn.py: trains to a usable accuracy fast, and its files load through the CLI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.py"


def _sample():
    spec = importlib.util.spec_from_file_location("digits_cnn_sample", SAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_train_save_and_inspect(tmp_path: Path) -> None:
    dc = _sample()
    data = dc.load_data()
    x_tr, y_tr, x_te, y_te = data
    assert x_tr.shape == (1297, 1, 8, 8) and x_te.shape == (500, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    assert torch.bincount(y_te).min() >= 45  # stratified: ~50 per class

    a, b = dc.build(), dc.build()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    t0 = time.perf_counter()
    model = dc.train(epochs=6, data=data)
    seconds = time.perf_counter() - t0
    acc = dc.accuracy(model, x_te, y_te)
    print(f"digits: held-out accuracy {acc:.4f} after 6 epochs, {seconds:.1f} s")
    assert acc >= 0.9

    paths = dc.save_artifacts(model, data, tmp_path)
    calib = np.load(paths["calib"])
    assert calib.shape == (256, 1, 8, 8) and calib.dtype == np.float32
    test = np.load(paths["test"])
    assert test["x"].shape == (500, 1, 8, 8) and test["y"].shape == (500,)

    proc = subprocess.run(
        [sys.executable, "-m", "lrcompress", "inspect", "samples/digits_cnn.py:build",
         "--weights", str(paths["weights"]), "--calib", str(paths["calib"])],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fc" in proc.stdout and "head" in proc.stdout

    # the saved weights rebuild the same classifier
    from safetensors.torch import load_file
    fresh = dc.build()
    fresh.load_state_dict(load_file(str(paths["weights"])))
    assert dc.accuracy(fresh, x_te, y_te) == acc
