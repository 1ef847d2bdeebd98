"""Hostile input, outputs: no output of any command may be one of its inputs or a folder that
holds one (whatever --overwrite says), side outputs are checked before any work and replace an
existing file only with --overwrite, and nothing half-written is left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import MLP, World, check_hostile, cli_run, file_hashes

Build = Callable[[World], list]


def _compress(w: World, *extra: object) -> list:
    return ["compress", MLP, "--calib", w.calib(), "--rank", "4", *extra]


def _recipe(w: World, source: str | None = None) -> Path:
    w.calib()
    src = source or MLP
    return w.text(f'source = "{src}"\n[data]\ncalib = "calib.npy"\neval = "calib.npy"\n[compress]\nratio = 0.5\n',
                  "r.toml")


def _validate(w: World, *extra: object) -> list:
    return ["validate", w.copy("mlp_onnx"), "--reference", MLP, "--data", w.calib(), "--runs", "2", *extra]


def _sweep(w: World, *extra: object) -> list:
    return ["sweep", MLP, "--calib", w.calib(), "--data", w.calib(name="held.npy"), "--ratios", "0.5", *extra]


def _recover(w: World, *extra: object) -> list:
    return ["recover", w.copy("tok_ck"), "--reference", "tests.models:tiny_token_model", "--data",
            w.copy("tok_data"), "--steps", "2", "--trust-code", *extra]


def _hardlink(w: World) -> Path:
    os.link(w.calib(), w.path("link.npy"))
    return w.path("link.npy")


def _symlink(w: World) -> Path:
    w.calib()
    os.symlink(w.inp, w.tmp / "alias")
    return w.tmp / "alias"


CASES: dict[str, tuple[Build, int, list[str]]] = {
    # class 2: -o is, holds or is above an input
    "compress-o-holds-calib": (lambda w: _compress(w, "-o", w.inp, "--overwrite"), 2, ["holds the input", "calib.npy"]),
    "compress-o-is-weights-folder": (lambda w: ["compress", MLP, "--rank", "4", "--weights", w.path("w.pt"),
                                                "-o", w.inp, "--overwrite"] if w.text(b"x", "w.pt") else [], 2,
                                     ["holds the input"]),
    "compress-o-holds-factory-file": (lambda w: ["compress", f"{w.payload()}:build", "--rank", "4", "-o", w.inp,
                                                 "--overwrite"], 2, ["holds the input", "evil.py"]),
    "compress-o-symlink-to-inputs": (lambda w: _compress(w, "-o", _symlink(w), "--overwrite"), 2, ["holds the input"]),
    "compress-o-dot": (lambda w: _compress(w, "-o", ".", "--overwrite"), 2, ["'.'", "choose a new folder"]),
    "compress-o-dotdot": (lambda w: _compress(w, "-o", "..", "--overwrite"), 2, ["'..'"]),
    "compress-o-cwd-by-name": (lambda w: _compress(w, "-o", str(Path.cwd()), "--overwrite"), 2, ["current folder"]),
    "export-o-is-checkpoint": (lambda w: ["export", w.copy("mlp_ck", "ck"), "--to", "onnx", "--inputs", w.calib(),
                                          "-o", w.path("ck"), "--overwrite", "--trust-code"], 2, ["is also an input"]),
    "export-o-above-checkpoint": (lambda w: ["export", w.copy("mlp_ck", "ck"), "--to", "onnx", "--inputs", w.calib(),
                                             "-o", w.inp, "--overwrite", "--trust-code"], 2, ["holds the input"]),
    "recover-o-is-reference-folder": (lambda w: ["recover", w.copy("tok_ck"), "--reference", w.path("tok_ck"),
                                                 "--data", w.copy("tok_data"), "-o", w.path("tok_ck"), "--overwrite",
                                                 "--trust-code"], 2, ["is also an input"]),
    "export-o-inside-checkpoint": (lambda w: ["export", w.copy("mlp_ck", "ck"), "--to", "onnx", "--inputs",
                                              w.calib(), "-o", w.path("ck") / "edge", "--trust-code"], 2,
                                   ["inside the input folder"]),
    "recover-plot-inside-checkpoint": (lambda w: _recover(w, "-o", w.out, "--plot", w.path("tok_ck") / "c.png"), 2,
                                       ["inside the input folder"]),
    "recover-o-holds-data": (lambda w: _recover(w, "-o", w.inp, "--overwrite"), 2, ["holds the input"]),
    "run-o-holds-recipe": (lambda w: ["run", _recipe(w), "-o", w.inp, "--overwrite", "--trust-code"], 2,
                           ["holds the input", "r.toml"]),
    "run-o-is-source-checkpoint": (lambda w: ["run", _recipe(w, "ck"), "-o", w.copy("mlp_ck", "ck"), "--overwrite"],
                                   2, ["is also an input"]),
    "sweep-keep-holds-calib": (lambda w: _sweep(w, "--keep", w.inp, "--overwrite"), 2, ["--keep", "holds the input"]),
    # class 3: side outputs onto inputs, existing files, bad places
    "save-recipe-onto-calib": (lambda w: _compress(w, "-o", w.out, "--save-recipe", w.path("calib.npy")), 2,
                               ["--save-recipe", "is also an input"]),
    "save-recipe-onto-weights": (lambda w: ["compress", MLP, "--rank", "4", "--weights", w.text(b"x", "w.pt"),
                                            "-o", w.out, "--save-recipe", w.path("w.pt"), "--overwrite"], 2,
                                 ["is also an input"]),
    "save-recipe-hardlink-of-calib": (lambda w: ["compress", MLP, "--calib", _hardlink(w), "--rank", "4", "-o", w.out,
                                                 "--save-recipe", w.path("calib.npy"), "--overwrite"], 2,
                                      ["is also an input"]),
    "save-recipe-exists": (lambda w: _compress(w, "-o", w.out, "--save-recipe", w.text("old", "keep.toml")), 2,
                           ["already exists", "--overwrite"]),
    "save-recipe-inside-o": (lambda w: _compress(w, "-o", w.out, "--save-recipe", w.out / "r.toml"), 2,
                             ["folder", "does not exist"]),
    "save-recipe-missing-folder": (lambda w: _compress(w, "-o", w.out, "--save-recipe", w.tmp / "no" / "r.toml"), 2,
                                   ["does not exist"]),
    "compress-plot-without-recovery": (lambda w: _compress(w, "-o", w.out, "--plot", w.tmp / "c.png"), 2,
                                       ["--plot", "--recover-steps"]),
    "compress-state-onto-calib": (lambda w: _compress(w, "-o", w.out, "--recover-steps", "2", "--state",
                                                      w.path("calib.npy")), 2, ["--state", "is also an input"]),
    "validate-json-onto-candidate": (lambda w: _validate(w, "--json", w.path("mlp.onnx")), 2,
                                     ["--json", "is also an input"]),
    "validate-json-onto-data": (lambda w: _validate(w, "--json", w.path("calib.npy"), "--overwrite"), 2,
                                ["is also an input"]),
    "validate-json-exists": (lambda w: _validate(w, "--json", w.text("{}", "v.json")), 2, ["already exists"]),
    "validate-json-missing-folder": (lambda w: _validate(w, "--json", w.tmp / "a" / "v.json"), 2, ["does not exist"]),
    "validate-json-is-folder": (lambda w: _validate(w, "--json", w.inp), 2, ["is a folder"]),
    "recover-plot-onto-data": (lambda w: _recover(w, "-o", w.out, "--plot", w.path("tokens.npz")), 2,
                               ["is also an input"]),
    "recover-plot-unknown-type": (lambda w: _recover(w, "-o", w.out, "--plot", w.tmp / "curve.bmp"), 2,
                                  ["(.bmp)", ".png"]),
    "recover-plot-under-a-file": (lambda w: _recover(w, "-o", w.out, "--plot", w.text("x", "f") / "c.png"), 2,
                                  ["is a file, not a folder"]),
    "recover-state-onto-data": (lambda w: _recover(w, "-o", w.out, "--state", w.path("tokens.npz")), 2,
                                ["--state", "is also an input"]),
    "run-save-recipe-onto-recipe": (lambda w: ["run", _recipe(w), "-o", w.out, "--save-recipe", w.path("r.toml"),
                                               "--overwrite", "--trust-code"], 2, ["is also an input"]),
    "run-save-recipe-onto-calib": (lambda w: ["run", _recipe(w), "-o", w.out, "--save-recipe", w.path("calib.npy"),
                                              "--trust-code"], 2, ["is also an input"]),
    "sweep-json-onto-calib": (lambda w: _sweep(w, "--json", w.path("calib.npy")), 2, ["--json", "is also an input"]),
    "sweep-plot-onto-data": (lambda w: _sweep(w, "--plot", w.path("held.npy")), 2, ["is also an input"]),
    "sweep-plot-unknown-type": (lambda w: _sweep(w, "--plot", w.tmp / "p.xyz"), 2, ["(.xyz)"]),
    "sweep-keep-existing-file": (lambda w: _sweep(w, "--keep", w.text("x", "k")), 2, ["--keep", "existing file"]),
    "sweep-json-and-plot-same": (lambda w: _sweep(w, "--json", w.tmp / "a.png", "--plot", w.tmp / "a.png"), 2,
                                 ["same place"]),
    "inspect-plot-under-a-file": (lambda w: ["inspect", MLP, "--plot", w.text("x", "f") / "s.png"], 2,
                                  ["is a file, not a folder"]),
    "inspect-plot-no-suffix": (lambda w: ["inspect", MLP, "--plot", w.tmp / "spectra"], 2, ["no suffix"]),
    "inspect-plot-exists": (lambda w: ["inspect", MLP, "--plot", w.text("x", "s.png")], 2, ["already exists"]),
    "inspect-suggest-onto-calib": (lambda w: ["inspect", MLP, "--calib", w.calib(), "--suggest-recipe",
                                              w.path("calib.npy"), "--overwrite"], 2, ["is also an input"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_outputs(case: str, world: World, capsys: pytest.CaptureFixture,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world.tmp)  # '-o .' names the folder that holds in/, '-o ..' the one above
    build, code, fragments = CASES[case]
    check_hostile(world, build(world), code, fragments, capsys)


def test_output_folder_honours_umask(world: World, capsys: pytest.CaptureFixture) -> None:
    """Output folders get the user's umask (mkdtemp's 0700 used to leak through the rename)."""
    old = os.umask(0o022)
    try:
        check_hostile(world, _compress(world, "-o", world.out, "-q"), 0, [], capsys)
    finally:
        os.umask(old)
    assert stat.S_IMODE(world.out.stat().st_mode) == 0o755


def test_overwrite_replaces_only_outputs(world: World, capsys: pytest.CaptureFixture) -> None:
    """--overwrite replaces an earlier output of the same command and a side file, nothing else."""
    argv = _compress(world, "-o", world.out, "--save-recipe", world.tmp / "r.toml", "-q")
    check_hostile(world, argv, 0, [], capsys)
    inputs = file_hashes(world.inp)
    assert cli_run(argv, capsys)[0] == 2  # both outputs exist now
    assert cli_run(argv + ["--overwrite"], capsys)[0] == 0
    assert file_hashes(world.inp) == inputs
    assert (world.out / "model.safetensors").is_file() and (world.tmp / "r.toml").is_file()
    assert sorted(p.name for p in world.tmp.iterdir()) == ["in", "out", "r.toml"]
