"""Hostile input, loading: no code runs without consent (--trust-code), a factory that
misbehaves at import is one line, and a tampered manifest is refused before anything is
allocated. Each row: (argv builder, exit code, fragments of the one-line message); the harness
also proves no input changed, nothing was left on disk and the payload's marker is absent."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import MLP, World, check_hostile

Build = Callable[[World], list]


def _export(ck: Path, w: World, *extra: str) -> list:
    return ["export", ck, "--to", "onnx", "--inputs", w.shared["x"], "-o", w.out, *extra]


def _layer(field: str, value: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        first = next(iter(m["layers"].values()))
        first[field] = value
    return edit


# ---- class 1: a compressed folder (or recipe) names code; nothing runs without --trust-code
TRUST: dict[str, tuple[Build, int, list[str]]] = {
    "export-folder-runs-no-code": (lambda w: _export(w.evil_ck(), w), 2, ["evil.py:build", "--trust-code"]),
    "validate-candidate-folder": (lambda w: ["validate", w.evil_ck(), "--reference", MLP, "--data", w.calib()],
                                  2, ["evil.py:build", "--trust-code"]),
    "validate-reference-folder": (lambda w: ["validate", w.copy("mlp_onnx"), "--reference", w.evil_ck(),
                                             "--data", w.calib()], 2, ["--trust-code"]),
    "recover-checkpoint": (lambda w: ["recover", w.evil_ck(), "--reference", MLP, "--data", w.calib(), "-o", w.out],
                           2, ["evil.py:build", "--trust-code"]),
    "recover-reference-folder": (lambda w: ["recover", w.copy("mlp_ck"), "--reference", w.evil_ck("x"),
                                            "--data", w.calib(), "-o", w.out, "--trust-code"],
                                 2, ["'x'", "not package.module:factory"]),
    "compress-from-folder": (lambda w: ["compress", w.evil_ck(), "--method", "svd", "--rank", "2", "-o", w.out],
                             2, ["--trust-code"]),
    "inspect-folder": (lambda w: ["inspect", w.evil_ck()], 2, ["--trust-code"]),
    "sweep-folder": (lambda w: ["sweep", w.evil_ck(), "--ratios", "0.5", "--methods", "svd", "--data", w.calib()],
                     2, ["--trust-code"]),
    "module-shipped-in-folder": (lambda w: _export(w.evil_ck(f"{w.payload('ck_code.py')}:build"), w), 2,
                                 ["ck_code.py:build", "--trust-code"]),
    "package-module-target": (lambda w: _export(w.evil_ck("tests.models:tiny_mlp"), w), 2,
                              ["tests.models:tiny_mlp", "--trust-code"]),
    "run-recipe-code-source": (lambda w: ["run", w.text(f'source = "{w.payload()}:build"\n[export]\nto = ["onnx"]\n',
                                                        "r.toml"), "-o", w.out], 2, ["--trust-code", "nothing was run"]),
    # with consent, a target that is not a factory is still refused before it is called
    "target-os-system": (lambda w: _export(w.evil_ck("os:system"), w, "--trust-code"), 2,
                         ["'os:system'", "not a factory", "not called"]),
    "target-needs-arguments": (lambda w: _export(w.evil_ck("subprocess:getoutput"), w, "--trust-code"), 2,
                               ["needs arguments (cmd)", "not called"]),
    "target-builtin-exit": (lambda w: _export(w.evil_ck("builtins:exit"), w, "--trust-code"), 2, ["not a factory"]),
    "target-not-a-string": (lambda w: _export(w.evil_ck(["os", "system"]), w, "--trust-code"), 2,  # type: ignore[arg-type]
                            ["not a factory name"]),
    "source-os-system": (lambda w: ["compress", "os:system", "--method", "svd", "--rank", "2", "-o", w.out], 2,
                         ["not a factory"]),
    "source-os-getcwd": (lambda w: ["inspect", "os:getcwd"], 2, ["not a factory"]),
    "source-class-not-module": (lambda w: ["inspect", "collections:OrderedDict"], 2, ["not a factory"]),
}


# ---- class 9: factories that misbehave at import
def _factory(w: World, body: str) -> str:
    code = f"{body}\nfrom tests.models import tiny_mlp\n\n\ndef build():\n    return tiny_mlp()\n"
    return f"{w.text(code, 'f.py')}:build"


EXIT_IN_FACTORY = "import sys\n\n\ndef build():\n    sys.exit(0)\n"

MISBEHAVE: dict[str, tuple[Build, int, list[str]]] = {
    "sys-exit-0-at-import": (lambda w: ["inspect", _factory(w, "import sys; sys.exit(0)")], 2,
                             ["f.py", "called sys.exit(0)", "__main__"]),
    "sys-exit-3-at-import": (lambda w: ["inspect", _factory(w, "raise SystemExit(3)")], 2, ["sys.exit(3)"]),
    "argparse-at-import": (lambda w: ["inspect", _factory(w, "import argparse\np = argparse.ArgumentParser()\n"
                                                             "p.add_argument('--n', required=True)\np.parse_args()")],
                           2, ["called sys.exit(2)", "usage:"]),
    "sys-exit-in-factory": (lambda w: ["inspect", f"{w.text(EXIT_IN_FACTORY, 'g.py')}:build"], 2,
                            ["g.py", "sys.exit(0)"]),
    "raises-at-import": (lambda w: ["inspect", _factory(w, "raise RuntimeError('boom')")], 2,
                         ["cannot import", "RuntimeError: boom"]),
    "prints-at-import": (lambda w: ["inspect", _factory(w, "print('hello from the factory')"), "--json"], 0,
                         ["hello from the factory"]),
}


# ---- class 7: a tampered manifest is checked against the weights file before allocation
MANIFEST: dict[str, tuple[Build, int, list[str]]] = {
    "rank-negative": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("rank", -3)), w, "--trust-code"), 2,
                      ["rank = -3", "outside [0, 2**31]"]),
    "rank-float-huge": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("rank", 1e10)), w, "--trust-code"), 2,
                        ["rank = 10000000000.0", "not an integer"]),
    "rank-int-huge": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("rank", 10**10)), w, "--trust-code"), 2,
                      ["rank = 10000000000"]),
    "rank-large-but-plausible": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("rank", 100000)), w,
                                                   "--trust-code"), 2, ["weights file holds", "do not belong together"]),
    "rank-off-by-one": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("rank", 5)), w, "--trust-code"), 2,
                        ["shape [5, 32]", "weights file holds [4, 32]"]),
    "dtype-complex": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("dtype", "complex128")), w,
                                        "--trust-code"), 2, ["dtype 'complex128'", "float32"]),
    "dtype-not-a-dtype": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("dtype", "manual_seed")), w,
                                            "--trust-code"), 2, ["dtype 'manual_seed'"]),
    "dtype-float64-mismatch": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("dtype", "float64")), w,
                                                 "--trust-code"), 2, ["float64", "F32"]),
    "shape-bool": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("shape", [True, 32])), w, "--trust-code"), 2,
                   ["damaged", "'shape': [True, 32]"]),
    "unknown-kind": (lambda w: _export(w.manifest(w.copy("mlp_ck"), _layer("kind", "warp")), w, "--trust-code"), 2,
                     ["damaged", "warp"]),
    "hf-class-not-a-model": (lambda w: _export(w.manifest(w.copy("mlp_ck"), lambda m: m["source"].update(
        kind="hf", **{"class": "pipeline"})), w), 2, ["cannot read", "config.json"]),
}

ALL = {**{f"trust-{k}": v for k, v in TRUST.items()}, **{f"import-{k}": v for k, v in MISBEHAVE.items()},
       **{f"manifest-{k}": v for k, v in MANIFEST.items()}}


@pytest.mark.parametrize("case", list(ALL), ids=list(ALL))
def test_hostile_loading(case: str, world: World, capsys: pytest.CaptureFixture) -> None:
    build, code, fragments = ALL[case]
    check_hostile(world, build(world), code, fragments, capsys)


def test_marker_shows_that_consent_runs_the_code(world: World, capsys: pytest.CaptureFixture) -> None:
    """Positive control: with --trust-code the same payload folder loads and its code runs."""
    ck = world.evil_ck()
    check_hostile(world, _export(ck, world, "--trust-code", "-q"), 0, [], capsys, marker_ok=True)
    assert world.marker.read_text() == "ran the factory" and (world.out / "model.onnx").is_file()


def test_python_load_needs_trust_code(world: World) -> None:
    import lrcompress
    from lrcompress.errors import SourceError
    ck = world.evil_ck()
    with pytest.raises(SourceError, match="trust_code=True"):
        lrcompress.load(ck)
    assert not world.marker.exists()
    model, _ = lrcompress.load(ck, trust_code=True)
    assert world.marker.exists() and sum(p.numel() for p in model.parameters()) > 0


def test_hf_class_must_be_a_transformers_model(world: World) -> None:
    """A manifest may only name transformers' own model classes (never an arbitrary attribute)."""
    from lrcompress.errors import SourceError
    from lrcompress.io.sources import hf_model_class
    for name in ("pipeline", "AutoTokenizer", "os", 3):
        with pytest.raises(SourceError, match="not a transformers model class"):
            hf_model_class(None, name)  # type: ignore[arg-type]


def test_hf_folder_with_remote_code_is_refused(world: World, capsys: pytest.CaptureFixture) -> None:
    """config.json naming custom code (auto_map) never runs it: transformers' own classes only."""
    import json
    folder = world.path("hf")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil-model", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    world.payload("hf/configuration_evil.py")
    world.payload("hf/modeling_evil.py")
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    check_hostile(world, ["inspect", folder], 2, ["cannot load the Hugging Face folder"], capsys)


def test_factory_import_leaves_sys_path_and_argv(world: World) -> None:
    import sys

    from lrcompress.io.sources import resolve
    path, argv = list(sys.path), list(sys.argv)
    resolve(f"{world.payload()}:build")
    assert sys.path == path and sys.argv == argv
