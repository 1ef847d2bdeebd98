"""Bad input never crashes: every user error is one line on stderr naming the bad value, the
rule and the fix, exit code 2, no traceback, and nothing left on disk.

Most cases call ``lrcompress.cli.main`` in-process (fast); a few run ``python -m lrcompress``
end to end. Toy factories from ``tests.models`` keep each case well under a second; the real
``minilm`` checkpoint is used only where a tokenizer is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from lrcompress.cli import main
from tests.conftest import (
    MLP,
    ROOT,
    TOK,
    Env,
    check_error_text,
    expect_ok,
    expect_user_error,
    leftovers,
    needs_minilm,
    run_main,
    snapshot,
)
from tests.models import tiny_mlp, tiny_token_model

# --------------------------------------------------------------------------------------------
# the error cases, in-process. Each builder returns (argv, substrings the message must contain).

Case = Callable[[Env], tuple[list, list[str]]]


def _mlp(e: Env, *extra: object) -> list:
    return ["compress", MLP, "-o", e.out, *extra]


def _state_with(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    s = tiny_mlp().state_dict()
    s.update(changes)
    return s


def _corrupt(e: Env) -> Path:
    return e.text(b"\x00garbage, not a safetensors file" * 8, "bad.safetensors")


def _truncated(e: Env) -> Path:
    p = e.weights(name="trunc.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _nan_weights(e: Env) -> Path:
    w = tiny_mlp().state_dict()["fc1.weight"].clone()
    w[3, 5] = float("nan")
    return e.weights(_state_with(**{"fc1.weight": w}), "nan.safetensors")


def _inf_weights(e: Env) -> Path:
    w = tiny_mlp().state_dict()["fc2.weight"].clone()
    w[0, 0] = float("inf")
    return e.weights(_state_with(**{"fc2.weight": w}), "inf.safetensors")


def _not_model_folder(e: Env) -> Path:
    d = e.path("notamodel")
    d.mkdir()
    (d / "notes.txt").write_text("hello\n")
    return d


def _empty_folder(e: Env) -> Path:
    d = e.path("empty")
    d.mkdir()
    return d


def _pickle(e: Env, obj: object, name: str = "model.pt") -> Path:
    p = e.path(name)
    torch.save(obj, p)
    return p


SOURCE_CASES: dict[str, Case] = {
    "missing-source": lambda e: (["compress", e.path("missing"), "-o", e.out, "--rank", 4],
                                 ["missing", "does not exist", "give a model folder"]),
    "empty-folder": lambda e: (["compress", _empty_folder(e), "-o", e.out, "--rank", 4],
                               ["empty", "is empty", "point SOURCE at"]),
    "folder-not-a-model": lambda e: (["compress", _not_model_folder(e), "-o", e.out, "--rank", 4],
                                     ["notamodel", "is not a model", "config.json"]),
    "unknown-file-type": lambda e: (["compress", e.text("x", "model.onnx"), "-o", e.out, "--rank", 4],
                                    ["model.onnx", "unknown type"]),
    "safetensors-as-source": lambda e: (["compress", e.weights(), "-o", e.out, "--rank", 4],
                                        ["w.safetensors", "no architecture", "--weights"]),
    "pickle-without-trust": lambda e: (["compress", _pickle(e, tiny_mlp()), "-o", e.out, "--rank", 4],
                                       ["model.pt", "pickle", "--trust-pickle"]),
    "pickle-not-a-module": lambda e: (["compress", _pickle(e, {"a": 1}), "--trust-pickle", "-o", e.out,
                                       "--rank", 4], ["model.pt", "dict", "not an nn.Module"]),
    "pickle-corrupt": lambda e: (["compress", e.text(b"not a pickle at all", "model.pt"), "--trust-pickle",
                                  "-o", e.out, "--rank", 4], ["model.pt", "cannot unpickle"]),
    "factory-module-missing": lambda e: (["compress", "no_such_pkg.models:f", "-o", e.out, "--rank", 4],
                                         ["no_such_pkg.models", "cannot import"]),
    "factory-attr-missing": lambda e: (["compress", "tests.models:nope", "-o", e.out, "--rank", 4],
                                       ["nope", "no callable"]),
    "factory-not-a-module": lambda e: (["compress", "tests.models:not_a_module", "-o", e.out, "--rank", 4],
                                       ["not_a_module", "not a torch.nn.Module"]),
    "factory-py-file-missing": lambda e: (["compress", f"{e.path('nofile.py')}:f", "-o", e.out, "--rank", 4],
                                          ["nofile.py", "does not exist"]),
    "weights-missing-file": lambda e: (_mlp(e, "--rank", 4, "--weights", e.path("nowhere.safetensors")),
                                       ["nowhere.safetensors", "does not exist"]),
    "weights-corrupt-safetensors": lambda e: (_mlp(e, "--rank", 4, "--weights", _corrupt(e)),
                                              ["bad.safetensors", "not a valid safetensors", "re-download"]),
    "weights-truncated-safetensors": lambda e: (_mlp(e, "--rank", 4, "--weights", _truncated(e)),
                                                ["trunc.safetensors", "corrupt or truncated"]),
    "weights-pickled-module": lambda e: (_mlp(e, "--rank", 4, "--weights", _pickle(e, tiny_mlp(), "mod.pt")),
                                         ["mod.pt", "weights_only=True", "state_dict()"]),
    "weights-not-tensors": lambda e: (_mlp(e, "--rank", 4, "--weights", _pickle(e, {"a": 1}, "d.pt")),
                                      ["d.pt", "does not hold a dict of tensors"]),
    "weights-keys-mismatch": lambda e: (_mlp(e, "--rank", 4, "--weights", e.weights(
        tiny_token_model().state_dict(), "tok.safetensors")),
        ["tok.safetensors", "do not match", "missing", "unexpected", "fc1.weight"]),
    "weights-key-renamed": lambda e: (_mlp(e, "--rank", 4, "--weights", e.weights(
        {("layer1.weight" if k == "fc1.weight" else k): v for k, v in tiny_mlp().state_dict().items()},
        "renamed.safetensors")), ["1 missing (e.g. fc1.weight)", "1 unexpected (e.g. layer1.weight)"]),
    "weights-shape-mismatch": lambda e: (_mlp(e, "--rank", 4, "--weights", e.weights(
        _state_with(**{"fc1.weight": torch.zeros(64, 31)}), "shape.safetensors")),
        ["shape.safetensors", "shape mismatches", "fc1.weight", "(64, 31)", "(64, 32)"]),
    "weights-shape-mismatch-pt": lambda e: (_mlp(e, "--rank", 4, "--weights", e.weights(
        _state_with(**{"head.bias": torch.zeros(11)}), "shape.pt")), ["shape.pt", "head.bias", "(11,)"]),
    "nan-weight": lambda e: (_mlp(e, "--rank", 4, "--method", "svd", "--weights", _nan_weights(e)),
                             ["fc1.weight", "NaN or Inf", "re-export"]),
    "inf-weight": lambda e: (_mlp(e, "--ratio", 0.5, "--method", "svd", "--weights", _inf_weights(e)),
                             ["fc2.weight", "NaN or Inf"]),
    "nan-weight-with-calib": lambda e: (_mlp(e, "--rank", 4, "--calib", e.mlp_calib(), "--weights",
                                             _nan_weights(e)), ["fc1.weight", "NaN or Inf"]),
}

BUDGET_CASES: dict[str, Case] = {
    "ratio-zero": lambda e: (_mlp(e, "--ratio", "0"), ["--ratio 0", "(0, 1]", "e.g. --ratio 0.5"]),
    "ratio-negative": lambda e: (_mlp(e, "--ratio", "-0.5"), ["--ratio -0.5", "(0, 1]"]),
    "ratio-above-one": lambda e: (_mlp(e, "--ratio", "1.5"), ["--ratio 1.5", "(0, 1]"]),
    "ratio-not-a-number": lambda e: (_mlp(e, "--ratio", "abc"), ["--ratio 'abc'", "not a number", "e.g. 0.5"]),
    "ratio-nan": lambda e: (_mlp(e, "--ratio", "nan"), ["--ratio", "nan", "not a finite number"]),
    "ratio-inf": lambda e: (_mlp(e, "--ratio", "inf"), ["--ratio", "inf", "not a finite number"]),
    "ratio-too-small-for-rank-1": lambda e: (_mlp(e, "--ratio", "0.001", "--method", "svd"),
                                             ["cannot hold even rank 1", "raise --ratio"]),
    "ratio-scope-model-below-rest": lambda e: (_mlp(e, "--ratio", "0.05", "--scope", "model", "--targets",
                                                    "head", "--method", "svd"),
                                               ["--ratio 0.05", "whole model", "raise --ratio"]),
    "rank-zero": lambda e: (_mlp(e, "--rank", "0"), ["--rank 0", ">= 1", "e.g. --rank 64"]),
    "rank-negative": lambda e: (_mlp(e, "--rank", "-3"), ["--rank -3", ">= 1"]),
    "rank-above-min-dim": lambda e: (_mlp(e, "--rank", "11"),
                                     ["--rank 11", "min(m, n) = 10", "'head'", "--rank <= 10", "--exclude head"]),
    "rank-not-a-number": lambda e: (_mlp(e, "--rank", "x"), ["--rank 'x'", "not a number", "integer"]),
    "rank-float": lambda e: (_mlp(e, "--rank", "2.5"), ["--rank '2.5'", "integer"]),
    "energy-zero": lambda e: (_mlp(e, "--energy", "0"), ["--energy 0", "(0, 1]", "e.g. --energy 0.95"]),
    "energy-above-one": lambda e: (_mlp(e, "--energy", "1.2"), ["--energy 1.2", "(0, 1]"]),
    "energy-nan": lambda e: (_mlp(e, "--energy", "nan"), ["--energy", "nan", "finite"]),
    "two-budgets": lambda e: (_mlp(e, "--rank", "4", "--ratio", "0.5"),
                              ["'rank'", "'ratio'", "exactly one of --rank, --ratio, --energy, --budget latency=F or --budget bytes=F"]),
    "three-budgets": lambda e: (_mlp(e, "--rank", "4", "--ratio", "0.5", "--energy", "0.9"),
                                ["'energy'", "exactly one"]),
    "no-budget": lambda e: (_mlp(e), ["none", "exactly one of --rank, --ratio, --energy, --budget latency=F or --budget bytes=F", "e.g. --ratio 0.5"]),
    "dry-run-bad-ratio": lambda e: (["compress", MLP, "--dry-run", "--ratio", "2"], ["--ratio 2", "(0, 1]"]),
    "dry-run-no-budget": lambda e: (["compress", MLP, "--dry-run"], ["exactly one"]),
    "dry-run-rank-too-big": lambda e: (["compress", MLP, "--dry-run", "--rank", "11"], ["'head'", "min(m, n)"]),
}

OPTION_CASES: dict[str, Case] = {
    "targets-exact-no-match": lambda e: (_mlp(e, "--rank", 4, "--targets", "fc9"),
                                         ["--targets 'fc9'", "matches no module", "e.g. fc1"]),
    "targets-glob-no-match": lambda e: (_mlp(e, "--rank", 4, "--targets", "encoder.*"),
                                        ["--targets 'encoder.*'", "matches no module", "glob"]),
    "targets-regex-no-match": lambda e: (_mlp(e, "--rank", 4, "--targets", "re:layer\\d+"),
                                         ["--targets 're:layer\\\\d+'", "matches no module"]),
    "targets-non-linear-module": lambda e: (_mlp(e, "--rank", 4, "--targets", "act"),
                                            ["['act']", "no Linear/Conv1D/Embedding/Conv2d layer"]),
    "targets-one-of-two-no-match": lambda e: (_mlp(e, "--rank", 4, "--targets", "fc1", "--targets", "fc7"),
                                              ["'fc7'", "matches no module"]),
    "exclude-no-match": lambda e: (_mlp(e, "--rank", 4, "--exclude", "decoder"),
                                   ["--exclude 'decoder'", "matches no module"]),
    "exclude-everything": lambda e: (_mlp(e, "--rank", 4, "--exclude", "*"),
                                     ["no layer is left", "widen --targets"]),
    "targets-invalid-regex": lambda e: (_mlp(e, "--rank", 4, "--targets", "re:("),
                                        ["--targets 're:('", "not a valid regular expression", "fix the pattern"]),
    "exclude-invalid-regex": lambda e: (_mlp(e, "--rank", 4, "--exclude", "re:fc[1"),
                                        ["--exclude 're:fc[1'", "not a valid regular expression"]),
    "method-unknown": lambda e: (_mlp(e, "--rank", 4, "--method", "bogus"), ["'bogus'", "svd-whiten", "tucker"]),
    "method-tucker-no-conv": lambda e: (_mlp(e, "--rank", 4, "--method", "tucker"),
                                        ["tucker", "Conv2d layers and the model has none"]),
    "tucker-rank-above-channels": lambda e: (["compress", "tests.models:conv_zoo", "-o", e.out, "--method",
                                              "tucker", "--rank", "99"], ["--rank 99", "channel counts", "<= 16"]),
    "cp-rank-zero": lambda e: (["compress", "tests.models:conv_zoo", "-o", e.out, "--method", "cp", "--rank",
                                "0"], ["--rank 0", ">= 1"]),
    "tt-shape-mismatch": lambda e: (["compress", "tests.models:conv_zoo", "-o", e.out, "--method", "tt",
                                     "--rank", "4", "--tt-shape", "4x4:4x4"], ["--tt-shape 4x4:4x4", "64x24"]),
    "tt-shape-syntax": lambda e: (["compress", "tests.models:conv_zoo", "-o", e.out, "--method", "tt",
                                   "--rank", "4", "--tt-shape", "8by8"], ["'8by8'", "8x12x16:8x8x6"]),
    "tt-shape-wrong-method": lambda e: (_mlp(e, "--rank", 4, "--tt-shape", "4x4:4x8"), ["--tt-shape", "--method tt"]),
    "share-group-too-large": lambda e: (["compress", "tests.models:stack", "-o", e.out, "--method", "shared-svd",
                                         "--rank", "4", "--share-group", "9"], ["--share-group 9", "4 blocks"]),
    "share-group-one": lambda e: (["compress", "tests.models:stack", "-o", e.out, "--method", "shared-svd",
                                   "--rank", "4", "--share-group", "1"], ["--share-group 1", ">= 2"]),
    "share-group-wrong-method": lambda e: (_mlp(e, "--rank", 4, "--share-group", "2"), ["--share-group",
                                                                                       "shared-svd"]),
    "shared-svd-no-blocks": lambda e: (_mlp(e, "--rank", 4, "--method", "shared-svd"), ["repeated blocks"]),
    "method-tt-prime-features": lambda e: (_mlp(e, "--rank", 4, "--method", "tt", "--targets", "head"),
                                           ["10", "modes"]),
    "method-whiten-without-calib": lambda e: (_mlp(e, "--rank", 4, "--method", "svd-whiten"),
                                              ["svd-whiten", "--calib FILE", "--method svd"]),
    "allocate-bogus": lambda e: (_mlp(e, "--ratio", 0.5, "--allocate", "bogus"),
                                 ["--allocate 'bogus'", "uniform", "global"]),
    "scope-bogus": lambda e: (_mlp(e, "--ratio", 0.5, "--scope", "all"), ["--scope 'all'", "targets", "model"]),
    "solver-bogus": lambda e: (_mlp(e, "--rank", 4, "--solver", "lanczos"), ["'lanczos'", "randomized"]),
    "device-bogus": lambda e: (_mlp(e, "--rank", 4, "--device", "tpu"), ["--device 'tpu'", "cpu or cuda"]),
    "batch-size-zero": lambda e: (_mlp(e, "--rank", 4, "--batch-size", 0, "--calib", e.mlp_calib()),
                                  ["--batch-size 0", ">= 1", "e.g. --batch-size 32"]),
    "batch-size-not-int": lambda e: (_mlp(e, "--rank", 4, "--batch-size", "many"), ["'many'", "--batch-size"]),
    "calib-samples-zero": lambda e: (_mlp(e, "--rank", 4, "--calib", e.mlp_calib(), "--calib-samples", 0),
                                     ["--calib-samples 0", ">= 1", "e.g. --calib-samples 256"]),
    "no-output": lambda e: (["compress", MLP, "--rank", 4], ["no output folder", "-o OUT", "--dry-run"]),
    "unknown-option": lambda e: (_mlp(e, "--rank", 4, "--frobnicate"), ["--frobnicate", "lrcompress --help"]),
    "missing-source-argument": lambda e: (["compress", "--rank", 4], ["SOURCE", "lrcompress --help"]),
}

DATA_CASES: dict[str, Case] = {
    "calib-missing-file": lambda e: (_mlp(e, "--rank", 4, "--calib", e.path("nothere.npy")),
                                     ["nothere.npy", "does not exist"]),
    "calib-missing-text-file": lambda e: (_mlp(e, "--rank", 4, "--calib", e.path("nothere.txt")),
                                          ["nothere.txt", "does not exist", "one example per line"]),
    "calib-folder": lambda e: (_mlp(e, "--rank", 4, "--calib", e.inp), ["is a folder"]),
    "calib-text-without-tokenizer": lambda e: (_mlp(e, "--rank", 4, "--calib", e.text("a line\nanother\n")),
                                               ["calib.txt", "no tokenizer", ".npy"]),
    "calib-text-not-utf8": lambda e: (_mlp(e, "--rank", 4, "--calib", e.text(b"\xff\xfe\xfa bad\n")),
                                      ["calib.txt", "not UTF-8", "convert it to UTF-8"]),
    "calib-unknown-suffix-empty": lambda e: (_mlp(e, "--rank", 4, "--calib", e.text("", "data.csv")),
                                             ["data.csv", "no non-blank lines"]),
    "calib-wrong-width": lambda e: (_mlp(e, "--rank", 4, "--calib", e.mlp_calib(d=31)),
                                    [", 31)", "do not fit the model", "shape and dtype"]),
    "calib-wrong-rank-3d": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.zeros((4, 5, 6), np.float32))),
                                      ["(4, 5, 6)", "do not fit the model"]),
    "calib-complex-dtype": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.ones((8, 32), np.complex64))),
                                      ["complex64", "float, int or bool"]),
    "calib-str-dtype": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.array([["a"] * 32] * 4))),
                                  ["<U1", "float, int or bool"]),
    "calib-object-dtype": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.array([{"a": 1}] * 4, dtype=object))),
                                     ["x.npy", "cannot read tensors", "re-save"]),
    "calib-bool-dtype": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.ones((8, 32), bool))),
                                   ["bool", "do not fit the model"]),
    "calib-int-dtype": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.ones((8, 32), np.int64))),
                                  ["int64", "do not fit the model"]),
    "calib-0d-array": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.float32(1.0))),
                                 ["shape ()", "first dimension of examples"]),
    "calib-zero-examples": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.zeros((0, 32), np.float32))),
                                      ["(0, 32)", "N >= 1"]),
    "calib-inf-input": lambda e: (_mlp(e, "--rank", 4, "--calib", e.npy(np.full((8, 32), np.inf, np.float32))),
                                  ["NaN/Inf", "8 of 8 examples", "must be finite"]),
    "calib-corrupt-npy": lambda e: (_mlp(e, "--rank", 4, "--calib", e.text(b"garbage" * 20, "bad.npy")),
                                    ["bad.npy", "cannot read tensors"]),
    "calib-corrupt-safetensors": lambda e: (_mlp(e, "--rank", 4, "--calib", _corrupt(e)),
                                            ["bad.safetensors", "cannot read tensors"]),
    "calib-npz-empty": lambda e: (_mlp(e, "--rank", 4, "--calib", _npz(e, {})), ["holds no arrays"]),
    "calib-npz-disagree-on-n": lambda e: (["compress", TOK, "-o", e.out, "--rank", 4, "--calib", e.tokens(
        attention_mask=np.ones((15, 12), np.int64))], ["disagree on the number of examples", "16", "15"]),
    "calib-npz-wrong-names": lambda e: (_mlp(e, "--rank", 4, "--calib", _npz(e, {"inputs": e_rand(4, 32)})),
                                        ["'inputs'", "do not fit the model", "unexpected keyword"]),
    "calib-token-ids-out-of-vocab": lambda e: (["compress", TOK, "-o", e.out, "--rank", 4, "--calib",
                                                e.tokens(high=500)], ["input_ids", "do not fit the model"]),
    "calib-token-ids-float": lambda e: (["compress", TOK, "-o", e.out, "--rank", 4, "--calib", e.tokens(
        input_ids=np.ones((16, 12), np.float32))], ["float32", "do not fit the model"]),
}


def e_rand(*shape: int) -> np.ndarray:
    return np.random.default_rng(2).standard_normal(shape).astype(np.float32)


def _npz(e: Env, arrays: dict[str, np.ndarray]) -> Path:
    p = e.path("arrays.npz")
    np.savez(p, **arrays)
    return p


INSPECT_CASES: dict[str, Case] = {
    "inspect-ratio-two": lambda e: (["inspect", MLP, "--ratio", "2"], ["--ratio 2", "(0, 1]"]),
    "inspect-ratio-abc": lambda e: (["inspect", MLP, "--ratio", "abc"], ["--ratio 'abc'", "not a number"]),
    "inspect-ratio-two-with-plot": lambda e: (["inspect", MLP, "--ratio", "2", "--plot", e.tmp / "s.png"],
                                              ["--ratio 2"]),
    "inspect-bad-regex": lambda e: (["inspect", MLP, "--targets", "re:("], ["re:(", "regular expression"]),
    "inspect-missing-source": lambda e: (["inspect", e.path("gone")], ["gone", "does not exist"]),
    "inspect-batch-size-zero": lambda e: (["inspect", MLP, "--batch-size", "0"], ["--batch-size 0"]),
    "inspect-calib-wrong-width": lambda e: (["inspect", MLP, "--calib", e.mlp_calib(d=31)], [", 31)", "do not fit"]),
    "inspect-weights-mismatch": lambda e: (["inspect", MLP, "--weights", e.weights(
        _state_with(**{"fc2.weight": torch.zeros(48, 63)}), "s.safetensors")], ["fc2.weight", "(48, 63)"]),
}

ALL_CASES = {**SOURCE_CASES, **BUDGET_CASES, **OPTION_CASES, **DATA_CASES, **INSPECT_CASES}


@pytest.mark.parametrize("case", list(ALL_CASES), ids=list(ALL_CASES))
def test_user_error(case: str, env: Env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv, contains = ALL_CASES[case](env)
    expect_user_error(argv, capsys, tmp_path, contains, out=env.out)


# --------------------------------------------------------------------------------------------
# positive controls: the same command lines with the bad value replaced by a good one


GOOD_CASES: dict[str, Case] = {
    "rank": lambda e: (_mlp(e, "--rank", "4"), []),
    "rank-10-fits-head": lambda e: (_mlp(e, "--rank", "10"), []),
    "ratio": lambda e: (_mlp(e, "--ratio", "0.5"), []),
    "ratio-one": lambda e: (_mlp(e, "--ratio", "1"), []),
    "energy": lambda e: (_mlp(e, "--energy", "0.9"), []),
    "targets-forms": lambda e: (_mlp(e, "--rank", 4, "--targets", "fc1", "--targets", "fc*",
                                     "--targets", "re:head"), []),
    "exclude": lambda e: (_mlp(e, "--rank", 4, "--exclude", "head"), []),
    "calib-npy": lambda e: (_mlp(e, "--rank", 4, "--calib", e.mlp_calib(), "--calib-samples", 16,
                                 "--batch-size", 4), []),
    "weights": lambda e: (_mlp(e, "--ratio", 0.5, "--method", "svd", "--weights", e.weights()), []),
    "weights-pt": lambda e: (_mlp(e, "--ratio", 0.5, "--weights", e.weights(name="w.pt")), []),
    "token-model-npz": lambda e: (["compress", TOK, "-o", e.out, "--ratio", 0.5, "--calib", e.tokens()], []),
    "nested-output": lambda e: (["compress", MLP, "-o", e.tmp / "a" / "b" / "out", "--rank", 4], []),
}


@pytest.mark.parametrize("case", list(GOOD_CASES), ids=list(GOOD_CASES))
def test_good_input_writes_checkpoint(case: str, env: Env, capsys: pytest.CaptureFixture) -> None:
    argv, _ = GOOD_CASES[case](env)
    argv = [str(a) for a in argv]
    out = Path(argv[argv.index("-o") + 1])
    expect_ok(argv, capsys, out)
    manifest = json.loads((out / "lrcompress.json").read_text())
    assert manifest["format"] == "lrcompress/1"


def test_good_dry_run_prints_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(tmp_path)
    code, out, err = run_main(["compress", MLP, "--dry-run", "--ratio", "0.5", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["params_model"] > 0
    assert snapshot(tmp_path) == before


def test_trust_pickle_loads_and_writes(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _pickle(env, tiny_mlp())
    expect_user_error(["compress", src, "-o", env.out, "--rank", 4], capsys, tmp_path, ["--trust-pickle"])
    expect_ok(["compress", src, "--trust-pickle", "-o", env.out, "--rank", 4], capsys, env.out,
              files=("model.pt", "lrcompress.json"))
    # the pickled output is itself refused without --trust-pickle
    expect_user_error(["compress", env.out, "-o", tmp_path / "again", "--rank", 2], capsys, tmp_path,
                      ["model.pt", "--trust-pickle"])


def test_compressed_folder_errors(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_ok(_mlp(env, "--rank", 4), capsys, env.out)
    out2 = tmp_path / "out2"
    # --weights cannot be combined with a compressed folder
    expect_user_error(["compress", env.out, "-o", out2, "--rank", 2, "--weights", env.weights()], capsys,
                      tmp_path, ["--weights", "compressed folder", "model.safetensors"])
    # a compressed folder with missing, unreadable or corrupt files
    broken = tmp_path / "broken"
    shutil.copytree(env.out, broken)
    (broken / "model.safetensors").unlink()
    expect_user_error(["compress", broken, "-o", out2, "--rank", 2], capsys, tmp_path,
                      ["broken", "no model.safetensors", "re-run compress"])
    shutil.rmtree(broken)
    shutil.copytree(env.out, broken)
    (broken / "lrcompress.json").write_text("{not json")
    expect_user_error(["compress", broken, "-o", out2, "--rank", 2], capsys, tmp_path,
                      ["lrcompress.json", "not valid JSON"])
    (broken / "lrcompress.json").write_text(json.dumps({"format": "lrcompress/0"}))
    expect_user_error(["compress", broken, "-o", out2, "--rank", 2], capsys, tmp_path,
                      ["'lrcompress/0'", "expected 'lrcompress/1'"])
    (broken / "model.safetensors").write_bytes(b"\x01" * 100)
    (broken / "lrcompress.json").write_text((env.out / "lrcompress.json").read_text())
    expect_user_error(["compress", broken, "-o", out2, "--rank", 2], capsys, tmp_path,
                      ["model.safetensors", "corrupt or truncated"])


def test_manifest_without_source_key(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_ok(_mlp(env, "--rank", 4), capsys, env.out)
    m = json.loads((env.out / "lrcompress.json").read_text())
    del m["source"]
    (env.out / "lrcompress.json").write_text(json.dumps(m))
    code, _, err = run_main(["compress", env.out, "-o", tmp_path / "out2", "--rank", 2], capsys)
    check_error_text(code, err, ["lrcompress.json"])


# --------------------------------------------------------------------------------------------
# output location


def test_output_is_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "result.txt"
    f.write_text("keep me\n")
    expect_user_error(["compress", MLP, "-o", f, "--rank", 4], capsys, tmp_path,
                      ["result.txt", "existing file", "choose a folder path"], out=tmp_path / "never")
    assert f.read_text() == "keep me\n"
    # --overwrite does not make a file acceptable either
    expect_user_error(["compress", MLP, "-o", f, "--rank", 4, "--overwrite"], capsys, tmp_path,
                      ["existing file"], out=tmp_path / "never")
    assert f.read_text() == "keep me\n"


def test_output_folder_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old\n")
    expect_user_error(["compress", MLP, "-o", out, "--rank", 4], capsys, tmp_path,
                      ["out", "is not empty", "--overwrite"], out=tmp_path / "never")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    # a later failure with --overwrite leaves the old folder untouched
    expect_user_error(["compress", MLP, "-o", out, "--rank", 11, "--overwrite"], capsys, tmp_path,
                      ["--rank 11"], out=tmp_path / "never")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    # with --overwrite it succeeds and replaces the folder
    expect_ok(["compress", MLP, "-o", out, "--rank", 4, "--overwrite"], capsys, out)
    assert not (out / "old.txt").exists()
    assert not leftovers(tmp_path)


def test_output_empty_folder_is_fine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    expect_ok(["compress", MLP, "-o", out, "--rank", 4], capsys, out)


def test_output_parent_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "somefile.txt"
    f.write_text("x\n")
    expect_user_error(["compress", MLP, "-o", f / "out", "--rank", 4], capsys, tmp_path,
                      ["somefile.txt", "is a file, not a folder", "choose another -o"])
    expect_user_error(["compress", MLP, "-o", f / "deeper" / "out", "--rank", 4], capsys, tmp_path,
                      ["somefile.txt", "is a file, not a folder"])


def test_output_in_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("permissions are not enforced here (running as root); the parent-is-a-file and "
                        "/proc tests exercise the unwritable-output path instead")
        expect_user_error(["compress", MLP, "-o", locked / "out", "--rank", 4], capsys, tmp_path,
                          ["locked", "Permission denied", "choose a writable -o"])
        expect_user_error(["compress", MLP, "-o", locked / "a" / "out", "--rank", 4], capsys, tmp_path,
                          ["locked", "Permission denied"])
    finally:
        locked.chmod(0o700)


PROC_WRITABLE = os.path.isdir("/proc") and os.access("/proc", os.W_OK)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
@pytest.mark.parametrize("target", ["/proc/lrcompress-test-out", "/proc/lrcompress-test/a/out"])
def test_output_under_proc(target: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["compress", MLP, "-o", target, "--rank", 4, "-q"], capsys)
    check_error_text(code, err, ["/proc", "-o"])
    assert not os.path.exists(target)


def _fail_save(*args: object, **kwargs: object) -> None:
    raise OSError(28, "No space left on device")


def test_disk_full_while_writing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_model", _fail_save)
    expect_user_error(["compress", MLP, "-o", tmp_path / "out", "--rank", 4], capsys, tmp_path,
                      ["out", "No space left on device", "check free space"])


def test_disk_full_while_writing_nested(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_model", _fail_save)
    expect_user_error(["compress", MLP, "-o", tmp_path / "a" / "b" / "out", "--rank", 4], capsys, tmp_path,
                      ["No space left on device"])


def test_overwrite_disk_full_keeps_old_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old\n")
    monkeypatch.setattr(safetensors.torch, "save_model", _fail_save)
    expect_user_error(["compress", MLP, "-o", out, "--rank", 4, "--overwrite"], capsys, tmp_path,
                      ["No space left on device"], out=tmp_path / "never")
    assert (out / "old.txt").read_text() == "old\n"


# --------------------------------------------------------------------------------------------
# calibration data that spans fewer directions than the requested rank


RANK_DEFICIENT = {
    "2-samples-rank-4": (["--calib-samples", 2, "--rank", 4], "few"),
    "2-samples-ratio": (["--calib-samples", 2, "--ratio", 0.5], "few"),
    "all-zero-inputs-ratio": (["--ratio", 0.5], "zero"),
    "all-zero-inputs-rank": (["--rank", 4], "zero"),
}


@pytest.mark.parametrize("case", list(RANK_DEFICIENT), ids=list(RANK_DEFICIENT))
def test_rank_deficient_calibration(case: str, env: Env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra, kind = RANK_DEFICIENT[case]
    calib = env.mlp_calib() if kind == "few" else env.npy(np.zeros((8, 32), np.float32), "zeros.npy")
    # calibration that spans fewer directions than the rank: the basis is completed, so it works
    expect_ok(_mlp(env, "--calib", calib, *extra), capsys, env.out)


def test_few_calibration_samples_with_energy_budget(env: Env, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    expect_ok(_mlp(env, "--calib", env.mlp_calib(), "--calib-samples", 2, "--energy", 0.99), capsys, env.out)


# --------------------------------------------------------------------------------------------
# inspect


def test_inspect_plot_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "spectra.png"
    code, out, err = run_main(["inspect", MLP, "--plot", png], capsys)
    assert code == 0, err
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fc1" in out and f"wrote {png}" in out


def test_inspect_good(tmp_path: Path, capsys: pytest.CaptureFixture, mlp_inputs: Path) -> None:
    code, out, err = run_main(["inspect", MLP, "--ratio", "0.3", "--calib", mlp_inputs, "--json"], capsys)
    assert code == 0, err
    assert {l["name"] for l in json.loads(out)["layers"]} == {"fc1", "fc2", "head"}


# --------------------------------------------------------------------------------------------
# cases that need a tokenizer (real MiniLM checkpoint)


def minilm_error(argv: list, capsys: pytest.CaptureFixture, tmp_path: Path, contains: list[str],
                 one_line: bool) -> None:
    """Like expect_user_error; with ``one_line=False`` other stderr lines (transformers' own
    progress output, see test_minilm_error_is_one_line) are tolerated before the error line."""
    if one_line:
        expect_user_error(argv, capsys, tmp_path, contains)
        return
    before = snapshot(tmp_path)
    code, stdout, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("lrcompress:")] == lines[-1:], err
    check_error_text(code, lines[-1] + "\n", contains)
    assert stdout == ""
    assert snapshot(tmp_path) == before


MINILM_CASES = {
    "empty-text": ("", [], ["calib.txt", "no non-blank lines", "one example per line"]),
    "blank-lines-only": ("\n   \n\t\n\n", [], ["calib.txt", "no non-blank lines", "one example per line"]),
    "max-length-zero": ("one line\nanother line\n", ["--max-length", 0], ["--max-length 0", ">= 1",
                                                                         "e.g. --max-length 128"]),
}


@needs_minilm
@pytest.mark.parametrize("case", list(MINILM_CASES), ids=list(MINILM_CASES))
def test_minilm_text_calibration_errors(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    content, extra, contains = MINILM_CASES[case]
    calib = tmp_path / "calib.txt"
    calib.write_text(content)
    minilm_error(["compress", "minilm", "-o", tmp_path / "out", "--ratio", 0.5, "--calib", calib, *extra],
                 capsys, tmp_path, contains, one_line=False)


@needs_minilm
def test_minilm_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n")
    minilm_error(["compress", "minilm", "-o", tmp_path / "out", "--ratio", 0.5, "--calib", calib],
                 capsys, tmp_path, ["no non-blank lines"], one_line=True)


@needs_minilm
def test_hf_folder_with_corrupt_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lrcompress.io.sources import minilm_path
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copyfile(minilm_path() / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"\x07" * 1000)
    expect_user_error(["compress", folder, "-o", tmp_path / "out", "--rank", 4], capsys, tmp_path,
                      ["model.safetensors", "corrupt or truncated"])
    (folder / "model.safetensors").unlink()
    expect_user_error(["compress", folder, "-o", tmp_path / "out", "--rank", 4], capsys, tmp_path,
                      ["has config.json but no weights"])


# --------------------------------------------------------------------------------------------
# end to end through `python -m lrcompress`


def run_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "lrcompress", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_e2e_bad_inputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((8, 31), np.float32))
    before = snapshot(tmp_path)
    for args, contains in [
        (("compress", MLP, "-o", out, "--ratio", "1.5"), ["--ratio 1.5"]),
        (("compress", tmp_path / "missing", "-o", out, "--rank", 4), ["missing", "does not exist"]),
        (("compress", MLP, "-o", out, "--rank", 4, "--calib", calib), ["(8, 31)", "do not fit"]),
    ]:
        r = run_cli(*args)
        assert r.stdout == ""
        check_error_text(r.returncode, r.stderr, contains)
        assert not out.exists()
        assert snapshot(tmp_path) == before


def test_e2e_good_input(tmp_path: Path, mlp_inputs: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("compress", MLP, "-o", out, "--ratio", "0.5", "--calib", mlp_inputs, "-q")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "lrcompress.json").is_file()
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------
# recovery (issue 4): recover / compress --recover-steps


@pytest.fixture(scope="module")
def token_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A compressed tiny token model and its token data, outside each test's tmp_path."""
    d = tmp_path_factory.mktemp("recover-inputs")
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(40, 10)), 199).astype(np.int64)
    data = d / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    ck = d / "ck"
    with pytest.raises(SystemExit) as exc:
        main(["compress", TOK, "--calib", str(data), "--ratio", "0.4", "-o", str(ck), "-q"])
    assert exc.value.code in (0, None)
    return ck, data


def _recover(*extra: str) -> Callable[[Path, Path], list]:
    """``recover CK --reference TOK --data D -o O`` plus ``extra`` (CK: the module's checkpoint)."""
    return lambda ck, t: ["recover", ck, "--reference", TOK, "--data", "D", "-o", "O", *extra]


RECOVER_CASES = {
    "not-a-checkpoint": (lambda ck, t: ["recover", t, "--reference", TOK, "--data", "D", "-o", "O"],
                         ["is not a compressed checkpoint"]),
    "reference-mismatch": (lambda ck, t: ["recover", ck, "--reference", MLP, "--data", "D", "-o", "O"],
                           ["--reference", "compressed from"]),
    "too-few-examples": (_recover("--batch-size", "64"), ["fewer than one batch", "--batch-size 64"]),
    "lora-rank-0": (_recover("--train", "lora", "--lora-rank", "0"), ["--lora-rank 0", ">= 1"]),
    "lora-rank-too-large": (_recover("--train", "both", "--lora-rank", "500"), ["--lora-rank 500", "too large"]),
    "lr-zero": (_recover("--lr", "0"), ["--lr 0", "> 0"]),
    "lr-negative": (_recover("--lr", "-1e-4"), ["--lr", "> 0"]),
    "lr-nan": (_recover("--lr", "nan"), ["--lr", "finite"]),
    "lr-text": (_recover("--lr", "fast"), ["--lr 'fast'", "not a number"]),
    "train-mode": (_recover("--train", "adapters"), ["--train 'adapters'", "factors, lora, both, all"]),
    "fold-mode": (_recover("--fold", "never"), ["--fold 'never'", "budget, exact"]),
    "eval-fraction": (_recover("--eval-fraction", "1.5"), ["--eval-fraction 1.5", "(0, 1)"]),
    "rank-schedule-syntax": (_recover("--train", "both", "--rank-schedule", "200-16"), ["STEP:RANK"]),
    "rank-schedule-shrinks": (_recover("--train", "both", "--rank-schedule", "10:4,5:8"), ["increasing steps"]),
    "rank-schedule-no-lora": (_recover("--rank-schedule", "10:16"), ["--train both"]),
    "loss-term": (_recover("--loss", "hidden,l1"), ["--loss", "hidden, pooled, kl"]),
    "augment-range": (_recover("--augment", "1"), ["--augment 1.0", "[0, 1)"]),
    "steps-zero": (_recover("--steps", "0"), ["--steps 0", ">= 1"]),
    "resume-without-state": (_recover("--resume"), ["--resume", "no recovery state"]),
    "output-is-input": (lambda ck, t: ["recover", ck, "--reference", TOK, "--data", "D", "-o", ck, "--overwrite"],
                        ["is also an input", "choose another -o"]),
    "compress-negative-steps": (lambda ck, t: ["compress", TOK, "--calib", "D", "--ratio", "0.5", "-o", "O",
                                               "--recover-steps", "-3"], ["--recover-steps -3", ">= 0"]),
    "compress-recover-without-data": (lambda ck, t: ["compress", TOK, "--method", "svd", "--ratio", "0.5", "-o", "O",
                                                     "--recover-steps", "10"], ["--recover-steps needs", "--calib"]),
}


@pytest.mark.parametrize("case", sorted(RECOVER_CASES))
def test_recover_bad_input(case: str, token_ckpt: tuple[Path, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    ck, data = token_ckpt
    build, contains = RECOVER_CASES[case]
    small = tmp_path / "small.npz"
    if case == "too-few-examples":
        np.savez(small, input_ids=np.ones((20, 6), np.int64))
    argv = [str(a) for a in build(ck, tmp_path)]
    argv = [str(small if case == "too-few-examples" else data) if a == "D" else str(tmp_path / "out") if a == "O"
            else a for a in argv]
    before_ck = snapshot(ck)
    expect_user_error(argv, capsys, tmp_path, contains, out=tmp_path / "out")
    assert snapshot(ck) == before_ck


def test_recover_mismatched_or_corrupt_state(token_ckpt: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    ck, data = token_ckpt
    state = tmp_path / "out.recover-state.pt"
    argv = ["recover", ck, "--reference", TOK, "--data", data, "-o", tmp_path / "out", "--resume", "--steps", "5"]
    torch.save({"fingerprint": "another run", "step": 3}, state)
    expect_user_error(argv, capsys, tmp_path, ["belongs to another run", "without --resume"])
    state.write_bytes(b"not a torch file")
    expect_user_error(argv, capsys, tmp_path, ["unreadable", "without --resume"])


def test_recover_nan_loss_stops_and_keeps_last_good_state(token_ckpt: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    ck, data = token_ckpt
    out = tmp_path / "out"
    code, stdout, err = run_main(["recover", ck, "--reference", TOK, "--data", data, "-o", out, "--steps", "20",
                                  "--batch-size", "8", "--lr", "1e30", "--clip", "1e30", "-q"], capsys)
    check_error_text(code, err, ["NaN", "step", "lower --lr", "kept in"])
    assert stdout == "" and not out.exists() and not leftovers(tmp_path)
    assert snapshot(tmp_path) == {"out.recover-state.pt"}  # the last good state, named in the message


def test_recover_pooled_loss_needs_token_outputs(tmp_path: Path, mlp_inputs: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    ck = tmp_path.parent / f"{tmp_path.name}-mlp-ck"
    code, _, err = run_main(["compress", MLP, "--calib", mlp_inputs, "--ratio", "0.5", "-o", ck, "-q"], capsys)
    assert code == 0, err
    expect_user_error(["recover", ck, "--reference", MLP, "--data", mlp_inputs, "-o", tmp_path / "out",
                       "--loss", "pooled"], capsys, tmp_path, ["--loss pooled", "use --loss hidden"])
