"""Hostile input to block-by-block compression: --stream, --max-memory, --calibration, --blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import expect_user_error, file_hashes, run_main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-stream")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(root / "m", max_shard_size="20KB")
    np.savez(root / "ids.npz", input_ids=np.random.default_rng(0).integers(2, 96, size=(16, 12)))
    return {"m": root / "m", "ids": root / "ids.npz"}


CASES = {
    "stream-not-hf": (["compress", "tests.models:mlp", "--stream", "--calib", "{ids}", "--ratio", "0.5"],
                      ["--stream reads a Hugging Face folder", "drop --stream"]),
    "stream-no-calib": (["compress", "{m}", "--stream", "--method", "svd", "--ratio", "0.5"],
                        ["--stream needs calibration data", "--calib FILE"]),
    "max-memory-not-size": (["compress", "{m}", "--stream", "--calib", "{ids}", "--ratio", "0.5", "--max-memory", "lots"],
                            ["--max-memory 'lots' is not a size", "e.g. --max-memory 8G"]),
    "max-memory-zero": (["compress", "{m}", "--stream", "--calib", "{ids}", "--ratio", "0.5", "--max-memory", "0G"],
                        ["--max-memory '0G' is not a size"]),
    "max-memory-too-low": (["compress", "{m}", "--stream", "--calib", "{ids}", "--ratio", "0.5", "--max-memory", "1M"],
                           ["--max-memory 1 MiB is below what streaming this model needs", "raise --max-memory to at least"]),
    "calibration-unknown": (["compress", "{m}", "--calib", "{ids}", "--ratio", "0.5", "--calibration", "loop"],
                            ["--calibration 'loop' is not one of", "closed"]),
    "blend-outside": (["compress", "{m}", "--calib", "{ids}", "--ratio", "0.5", "--calibration", "closed",
                       "--closed-blend", "2"], ["--closed-blend 2", "outside [0, 1]"]),
    "ridge-nan": (["compress", "{m}", "--calib", "{ids}", "--ratio", "0.5", "--calibration", "closed",
                   "--closed-ridge", "nan"], ["--closed-ridge"]),
    "blocks-nothing": (["compress", "{m}", "--calib", "{ids}", "--ratio", "0.5", "--calibration", "closed",
                        "--blocks", "model.nothing"], ["--blocks 'model.nothing' matches 0 module lists", "model.layers"]),
    "stream-recover": (["compress", "{m}", "--stream", "--calib", "{ids}", "--ratio", "0.5", "--recover-steps", "3"],
                       ["--recover-steps cannot be combined with --stream"]),
    "stream-dry-run": (["compress", "{m}", "--stream", "--calib", "{ids}", "--ratio", "0.5", "--dry-run"],
                       ["--dry-run cannot be combined with --stream"]),
    "closed-plain-svd": (["compress", "{m}", "--calib", "{ids}", "--ratio", "0.5", "--calibration", "closed",
                          "--method", "svd"], ["--calibration closed", "--method svd does not build"]),
    "closed-shared": (["compress", "{m}", "--calib", "{ids}", "--ratio", "0.5", "--calibration", "closed",
                       "--method", "shared-svd"], ["--method shared-svd shares bases across blocks"]),
    "closed-latency": (["compress", "{m}", "--calib", "{ids}", "--budget", "latency=0.5", "--calibration", "closed"],
                       ["--calibration closed works with --ratio", "not --budget latency"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error(case: str, folder: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv, contains = CASES[case]
    argv = [a.format(**{k: str(v) for k, v in folder.items()}) for a in argv] + ["-o", str(tmp_path / "out")]
    expect_user_error(argv, capsys, tmp_path, contains)


def test_index_naming_a_missing_shard(folder: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder["m"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (bad / first).unlink()
    expect_user_error(["compress", bad, "--stream", "--calib", folder["ids"], "--ratio", "0.5", "-o", tmp_path / "out"],
                      capsys, tmp_path, [first, "not a file in the folder"])
    index["weight_map"] = {k: "../../etc/passwd" for k in index["weight_map"]}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_user_error(["compress", bad, "--stream", "--calib", folder["ids"], "--ratio", "0.5", "-o", tmp_path / "out"],
                      capsys, tmp_path, ["'../../etc/passwd'", "not a file in the folder"])


def test_foreign_partial_folder_is_not_deleted(folder: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / ".out.lrcompress-partial"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    expect_user_error(["compress", folder["m"], "--stream", "--calib", folder["ids"], "--ratio", "0.5",
                       "-o", tmp_path / "out"], capsys, tmp_path, ["was not made by lrcompress", "move it away"])
    assert (foreign / "precious.txt").read_text() == "mine"


def test_stream_leaves_its_input_untouched(folder: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = file_hashes(folder["m"].parent)
    for extra in ([], ["--calibration", "closed", "--overwrite"]):
        code, out, err = run_main(["compress", str(folder["m"]), "--stream", "--calib", str(folder["ids"]), "--ratio",
                                   "0.5", "--max-memory", "4G", "-o", str(tmp_path / "out"), "-q", *extra], capsys)
        assert code == 0, err
    assert file_hashes(folder["m"].parent) == before
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
