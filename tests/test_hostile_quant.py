"""Hostile input to quantization: --budget bytes, --block-size, --quantize-algorithm, the int4 export
options, and a --budget bytes checkpoint whose grids were edited or removed. Every refusal is exit 2
with one 'lrcompress: error:' line naming the value, the rule and the fix, no traceback, every input
byte-identical and nothing written (tests.conftest.check_hostile)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import MLP, World, check_hostile, cli_run, file_hashes, save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def in96() -> nn.Module:
    """A tensor-input model whose first Linear has 96 inputs (blocks of 64 do not divide it)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 16))


IN96 = "tests.test_hostile_quant:in96"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT folder (no tokenizer), token ids, one example, and its --budget bytes=0.3 checkpoint
    (RTN: the fastest plan; the tiny models of tests.models are below the plan's fixed graph overhead)."""
    root = tmp_path_factory.mktemp("hostile-quant")
    save_tiny_bert(root / "bert")
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.2, size=(24, 16)), 1023).astype(np.int64)
    np.savez(root / "ids.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    np.savez(root / "one.npz", input_ids=ids[:1], attention_mask=np.ones_like(ids[:1]))
    from lrcompress.cli import main
    source_before = file_hashes(root)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["compress", root / "bert", "--calib", root / "ids.npz", "--budget", "bytes=0.3",
                               "--quantize-algorithm", "rtn", "-o", root / "ck", "-q"]])
    assert exc.value.code in (0, None)
    assert (root / "ck" / "quant.safetensors").is_file()
    after = {k: v for k, v in file_hashes(root).items() if not k.startswith("ck/")}
    return {"bert": root / "bert", "ids": root / "ids.npz", "one": root / "one.npz", "ck": root / "ck",
            "compress_changed": sorted(k for k in source_before.keys() | after.keys()
                                       if source_before.get(k) != after.get(k))}


def _copy(world: World, src: Path, name: str | None = None) -> Path:
    dst = world.path(name or src.name)
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# compress: the byte budget and its options (a tensor-input toy: refused before any work)

COMPRESS = {
    "bytes-zero": (["--budget", "bytes=0"], ["--budget bytes=0", "outside (0, 1]", "e.g. --budget bytes=0.15"]),
    "bytes-above-one": (["--budget", "bytes=1.5"], ["--budget bytes=1.5", "outside (0, 1]", "e.g. --budget bytes=0.15"]),
    "bytes-not-a-number": (["--budget", "bytes=abc"], ["--budget bytes 'abc'", "not a number", "e.g."]),
    "bytes-nan": (["--budget", "bytes=nan"], ["--budget bytes", "nan"]),
    "block-48": (["--budget", "bytes=0.3", "--block-size", "48"],
                 ["--block-size 48", "not a power of two >= 16", "use 16, 32, 64 or 128"]),
    "block-8": (["--budget", "bytes=0.3", "--block-size", "8"],
                ["--block-size 8", "not a power of two >= 16", "use 16, 32, 64 or 128"]),
    "algorithm-awq": (["--budget", "bytes=0.3", "--quantize-algorithm", "awq"],
                      ["--quantize-algorithm 'awq'", "not one of gptq, rtn", "use gptq"]),
    "with-stream": (["--budget", "bytes=0.2", "--stream"], ["--stream does not work with --budget bytes", "drop it"]),
    "with-recover": (["--budget", "bytes=0.2", "--recover-steps", "5"],
                     ["--recover-steps does not work with --budget bytes", "drop it"]),
    "with-method-svd": (["--budget", "bytes=0.2", "--method", "svd"],
                        ["--budget bytes", "needs --method svd-whiten", "(got svd)"]),
    "with-closed": (["--budget", "bytes=0.2", "--calibration", "closed"],
                    ["--calibration closed", "not --budget bytes", "use --calibration open"]),
    "with-ratio": (["--budget", "bytes=0.2", "--ratio", "0.5"], ["--budget bytes=0.2 contradicts --ratio", "give one budget"]),
}


@pytest.mark.parametrize("case", sorted(COMPRESS))
def test_compress_refuses(case: str, world: World, capsys: pytest.CaptureFixture) -> None:
    extra, fragments = COMPRESS[case]
    argv = ["compress", MLP, "--trust-code", "--calib", world.calib(), *extra, "-o", world.out]
    check_hostile(world, argv, 2, fragments, capsys)


def test_compress_dry_run_refused(world: World, capsys: pytest.CaptureFixture) -> None:
    check_hostile(world, ["compress", MLP, "--trust-code", "--calib", world.calib(), "--budget", "bytes=0.2",
                          "--dry-run"], 2, ["--dry-run does not work with --budget bytes", "drop it"], capsys)


def test_compress_svd_whiten_without_calib(world: World, capsys: pytest.CaptureFixture) -> None:
    check_hostile(world, ["compress", MLP, "--trust-code", "--method", "svd-whiten", "--budget", "bytes=0.2",
                          "-o", world.out], 2, ["--budget bytes=0.2", "calibration", "--calib FILE"], capsys)


def test_compress_without_calib_says_pass_calib(world: World, capsys: pytest.CaptureFixture) -> None:
    check_hostile(world, ["compress", MLP, "--trust-code", "--budget", "bytes=0.2", "-o", world.out], 2,
                  ["--budget bytes", "--calib FILE"], capsys)


def test_unmeetable_budget_names_the_minimum(bert: dict[str, Path], world: World, capsys: pytest.CaptureFixture) -> None:
    src = _copy(world, bert["bert"])
    ids = _copy(world, bert["ids"])
    err = check_hostile(world, ["compress", src, "--calib", ids, "--budget", "bytes=0.01", "--quantize-algorithm",
                                "rtn", "-o", world.out], 2,
                        ["--budget bytes=0.01", "cannot be met", "raise it to at least bytes=0."], capsys)
    assert "bytes=0.01 (" in err  # the budget in bytes, then the bytes needed


def test_unmeetable_on_a_tiny_model_suggests_a_valid_value(world: World, capsys: pytest.CaptureFixture) -> None:
    import re
    err = check_hostile(world, ["compress", MLP, "--trust-code", "--calib", world.calib(), "--budget", "bytes=0.9",
                                "-o", world.out], 2, ["cannot be met"], capsys)
    m = re.search(r"at least bytes=([0-9.]+)", err)
    assert m is None or float(m.group(1)) <= 1.0, err


# --------------------------------------------------------------------------------------------
# export: int4 options


EXPORT = {
    "block-48": (["--quantize", "int4", "--block-size", "48"], [" 48 ", "not a power of two >= 16", "use 16, 32, 64 or 128"]),
    "block-8": (["--quantize", "int4", "--block-size", "8"], [" 8 ", "not a power of two >= 16"]),
    "algorithm-gptq": (["--quantize", "int4", "--int4-algorithm", "gptq"],
                       ["int4 algorithm 'gptq'", "not one of rtn, hqq", "--quantize-algorithm gptq"]),
    "accuracy-7": (["--quantize", "int4", "--accuracy-level", "7"], ["accuracy_level=7", "not one of (0, 1, 2, 3, 4)"]),
    "quantize-int3": (["--quantize", "int3"], ["int3"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT))
def test_export_refuses(case: str, world: World, capsys: pytest.CaptureFixture) -> None:
    extra, fragments = EXPORT[case]
    x = world.npy(np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32))
    argv = ["export", IN96, "--trust-code", "--to", "onnx", "--inputs", x, *extra, "-o", world.out]
    check_hostile(world, argv, 2, fragments, capsys)


def test_export_block_not_dividing_the_input_dim(world: World, capsys: pytest.CaptureFixture) -> None:
    x = world.npy(np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32))
    check_hostile(world, ["export", IN96, "--trust-code", "--to", "onnx", "--quantize", "int4", "--block-size", "64",
                          "--inputs", x, "-o", world.out], 2,
                  ["64 does not divide dimension 96", "32"], capsys)
    # the same model with a block that divides 96 and 64 exports
    got, _, err = cli_run(["export", IN96, "--trust-code", "--to", "onnx", "--quantize", "int4", "--block-size", "32",
                           "--inputs", x, "-o", world.out, "-q"], capsys)
    assert got == 0, err
    assert (world.out / "model.int4.onnx").is_file()


# --------------------------------------------------------------------------------------------
# a --budget bytes checkpoint: its grids are what it exports, and only those


def test_export_int8_of_a_byte_checkpoint_refused(bert: dict[str, Path], world: World,
                                                   capsys: pytest.CaptureFixture) -> None:
    ck = _copy(world, bert["ck"])
    one = _copy(world, bert["one"])
    check_hostile(world, ["export", ck, "--to", "onnx", "--quantize", "int8", "--inputs", one, "-o", world.out], 2,
                  ["--quantize int8 does not apply", "--budget bytes plan", "--quantize int4"], capsys)


def _edit_codes(ck: Path) -> str:
    from safetensors.torch import load_file, save_file
    t = load_file(str(ck / "quant.safetensors"))
    key = min(k for k in t if k.endswith(".codes") and k.startswith("encoder."))
    name = key[: -len(".codes")]
    c = t[key].clone()
    assert float(t[f"{name}.scales"][0, 0]) != 0  # the edit changes the weight (a zero block would hide it)
    c[0, 0] = 1 if int(c[0, 0]) != 1 else 2  # still inside int4 / int8
    t[key] = c
    save_file(t, str(ck / "quant.safetensors"), metadata={"format": "lrcompress-grids/1"})
    return name


def test_export_refuses_an_edited_code(bert: dict[str, Path], world: World, capsys: pytest.CaptureFixture) -> None:
    ck = _copy(world, bert["ck"])
    one = _copy(world, bert["one"])
    name = _edit_codes(ck)
    before = file_hashes(ck)
    check_hostile(world, ["export", ck, "--to", "onnx", "--inputs", one, "-o", world.out], 2,
                  ["quant.safetensors", f"{name!r}", "do not reproduce its weight", "re-run lrcompress compress"], capsys)
    assert file_hashes(ck) == before


@pytest.mark.parametrize("edit", ["block", "symmetric", "bits-int8-to-int4", "emptied"])
def test_export_refuses_an_edited_manifest_entry(edit: str, bert: dict[str, Path], world: World,
                                                 capsys: pytest.CaptureFixture) -> None:
    ck = _copy(world, bert["ck"])
    one = _copy(world, bert["one"])
    entries = json.loads((ck / "lrcompress.json").read_text())["quantization"]
    int8 = sorted(n for n, e in entries.items() if e["bits"] == 8)

    def change(m: dict) -> None:
        q = m["quantization"]
        first = min(q)
        if edit == "block":
            q[first]["block"] = 16
        elif edit == "symmetric":
            q[first]["symmetric"] = False
        elif edit == "bits-int8-to-int4":
            q[int8[0]]["bits"] = 4
        else:
            m["quantization"] = {}

    if edit == "bits-int8-to-int4" and not int8:
        pytest.skip("the plan chose no int8 grid")
    world.manifest(ck, change)
    before = file_hashes(ck)
    check_hostile(world, ["export", ck, "--to", "onnx", "--inputs", one, "-o", world.out], 2,
                  ["re-run lrcompress compress"], capsys)
    assert file_hashes(ck) == before


def test_export_refuses_a_manifest_missing_one_grid(bert: dict[str, Path], world: World,
                                                    capsys: pytest.CaptureFixture) -> None:
    ck = _copy(world, bert["ck"])
    one = _copy(world, bert["one"])
    world.manifest(ck, lambda m: m["quantization"].pop(min(m["quantization"])))
    check_hostile(world, ["export", ck, "--to", "onnx", "--inputs", one, "-o", world.out], 2,
                  ["re-run lrcompress compress"], capsys)


def test_export_refuses_a_missing_grid_file(bert: dict[str, Path], world: World, capsys: pytest.CaptureFixture) -> None:
    ck = _copy(world, bert["ck"])
    one = _copy(world, bert["one"])
    (ck / "quant.safetensors").unlink()
    check_hostile(world, ["export", ck, "--to", "onnx", "--inputs", one, "-o", world.out], 2,
                  ["quant.safetensors", "cannot be read", "re-run lrcompress compress"], capsys)


def test_compress_and_export_leave_their_inputs_untouched(bert: dict, world: World,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert bert["compress_changed"] == []  # the module fixture's compress --budget bytes: model folder and data
    ck, one = _copy(world, bert["ck"], "ck"), _copy(world, bert["one"])
    before = file_hashes(world.inp)
    got, _, err = cli_run(["export", ck, "--to", "onnx", "--inputs", one, "--accuracy-level", "0", "-o",
                           world.tmp / "e", "-q"], capsys)
    assert got == 0, err
    assert (world.tmp / "e" / "model.int4.onnx").is_file()
    assert file_hashes(world.inp) == before
    assert sorted(p.name for p in world.inp.iterdir()) == ["ck", "one.npz"]
