"""Bad input for recipes (`run`), `sweep`, `--budget latency=`, `--save-recipe` and
`inspect --suggest-recipe`: one line naming value, rule and fix; exit 2; nothing on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import MLP, Env, expect_user_error

GOOD = f"""source = "{MLP}"
[data]
calib = "calib.npy"
eval = "calib.npy"
[compress]
method = "svd-whiten"
ratio = 0.5
[export]
to = ["onnx"]
[validate]
artifact = "onnx"
max_cosine_drift = 0.5
"""


def recipe(e: Env, text: str | None = None, **replace: str) -> Path:
    """GOOD (or ``text``) with ``old=new`` swaps, beside a calibration file."""
    e.mlp_calib()
    body = GOOD if text is None else text
    for old, new in replace.items():
        old = old.replace("__", " = ").replace("_DOT_", ".")
        assert old in body, old
        body = body.replace(old, new)
    p = e.path("r.toml")
    p.write_text(body)
    return p


def run(e: Env, **replace: str) -> list:
    return ["run", recipe(e, **replace), "-o", e.out]


Case = Callable[[Env], tuple[list, list[str]]]

CASES: dict[str, Case] = {
    "recipe-missing": lambda e: (["run", e.path("none.toml"), "-o", e.out], ["none.toml", "does not exist"]),
    "recipe-syntax": lambda e: (run(e, ratio__0_DOT_5="ratio = = 0.5"), ["TOML syntax error", "line 7", "column"]),
    "recipe-unknown-key": lambda e: (run(e, ratio__0_DOT_5="ratoi = 0.5"), ["'ratoi'", "did you mean 'ratio'"]),
    "recipe-unknown-section": lambda e: (run(e, **{"[export]": "[exprt]"}), ["'exprt'", "did you mean 'export'"]),
    "recipe-wrong-type": lambda e: (run(e, ratio__0_DOT_5='ratio = "half"'), ["ratio = 'half'", "must be a number"]),
    "recipe-wrong-type-list": lambda e: (run(e, **{'to = ["onnx"]': 'to = "onnx"'}), ["to = 'onnx'", "a list"]),
    "recipe-ratio-range": lambda e: (run(e, ratio__0_DOT_5="ratio = 1.5"), ["--ratio 1.5", "(0, 1]"]),
    "recipe-contradictory-budgets": lambda e: (run(e, ratio__0_DOT_5="ratio = 0.5\nlatency = 0.6"),
                                               ["contradictory budgets", "ratio", "latency"]),
    "recipe-no-budget": lambda e: (run(e, ratio__0_DOT_5=""), ["exactly one of"]),
    "recipe-bytes-with-rules": lambda e: (run(e, **{"ratio = 0.5": "bytes = 0.5",
                                                    "[export]": "[[compress.rules]]\nmatch = 'fc1'\ndense = true\n[export]"}),
                                          ["bytes budget", "rules", "drop the rules"]),
    "recipe-rule-two-budgets": lambda e: (run(e, **{"[export]": "[[compress.rules]]\nmatch = 'fc1'\nrank = 2\n"
                                                                 "ratio = 0.5\n[export]"}),
                                          ["rule", "fc1", "exactly one of rank, ratio, energy"]),
    "recipe-rule-dense-and-rank": lambda e: (run(e, **{"[export]": "[[compress.rules]]\nmatch = 'fc1'\ndense = true\n"
                                                                    "rank = 2\n[export]"}),
                                             ["dense = true contradicts", "rank"]),
    "recipe-rule-matches-nothing": lambda e: (run(e, **{"[export]": "[[compress.rules]]\nmatch = 'nope*'\nrank = 2\n"
                                                                     "[export]"}),
                                              ["'nope*'", "matches no factorizable layer", "fc1"]),
    "recipe-rule-bad-regex": lambda e: (run(e, **{"[export]": "[[compress.rules]]\nmatch = 're:('\nrank = 2\n[export]"}),
                                        ["re:(", "regular expression"]),
    "recipe-gate-unknown": lambda e: (run(e, max_cosine_drift__0_DOT_5="max_cosine_drfit = 0.5"),
                                      ["'max_cosine_drfit'", "did you mean 'max_cosine_drift'"]),
    "recipe-gate-negative": lambda e: (run(e, max_cosine_drift__0_DOT_5="max_cosine_drift = -0.5"),
                                       ["max_cosine_drift", "-0.5"]),
    "recipe-gate-nan": lambda e: (run(e, max_cosine_drift__0_DOT_5="max_cosine_drift = nan"),
                                  ["max_cosine_drift", "must be a number"]),
    "recipe-export-target": lambda e: (run(e, **{'to = ["onnx"]': 'to = ["onnx", "tflite"]'}),
                                       ["tflite", "onnx, ort, coreml"]),
    "recipe-artifact-not-exported": lambda e: (run(e, **{'artifact = "onnx"': 'artifact = "coreml"'}),
                                               ["'coreml' is not exported"]),
    "recipe-validate-without-eval": lambda e: (run(e, **{'eval = "calib.npy"\n': ""}), ["[data].eval"]),
    "recipe-data-missing": lambda e: (run(e, **{'calib = "calib.npy"': 'calib = "gone.npy"'}),
                                      ["gone.npy", "does not exist", "relative to the recipe"]),
    "recipe-no-source": lambda e: (run(e, **{f'source = "{MLP}"': ""}), ["no 'source'"]),
    "recipe-method": lambda e: (run(e, **{'method = "svd-whiten"': 'method = "pca"'}), ["pca", "svd-whiten"]),
    "recipe-recovery-key": lambda e: (run(e, **{"[export]": "[recovery]\nstpes = 3\n[export]"}),
                                      ["'stpes'", "did you mean 'steps'"]),
    "recipe-recovery-value": lambda e: (run(e, **{"[export]": "[recovery]\nsteps = 0\n[export]"}),
                                        ["--steps 0", ">= 1"]),
    "recipe-latency-int8-type": lambda e: (run(e, ratio__0_DOT_5="latency = 0.5\nlatency_int8 = 'yes'"),
                                           ["latency_int8 = 'yes'", "true or false"]),
    "recipe-latency-zero": lambda e: (run(e, ratio__0_DOT_5="latency = 0.0"), ["latency=0.0", "(0, 1]"]),
    # issue 12: method and export names come from the registries, recipe types from the dataclasses
    "recipe-rule-method": lambda e: (run(e, **{"[export]": "[[compress.rules]]\nmatch = 'fc1'\nmethod = 'pca'\nrank = 2\n"
                                                           "[export]"}), ["'pca'", "svd-whiten", "tucker"]),
    "recipe-option-of-another-method": lambda e: (run(e, ratio__0_DOT_5="ratio = 0.5\nshare_group = 2"),
                                                  ["'share_group'", "[compress]"]),
    "recipe-option-wrong-type": lambda e: (run(e, ratio__0_DOT_5="ratio = 0.5\nsolver = 3"), ["solver=3"]),
    "recipe-seed-type": lambda e: (run(e, ratio__0_DOT_5="ratio = 0.5\nseed = 'zero'"),
                                   ["seed = 'zero'", "an integer", "seed = 0"]),
    "recipe-targets-type": lambda e: (run(e, ratio__0_DOT_5="ratio = 0.5\ntargets = 'fc1'"),
                                      ["targets = 'fc1'", "a list", "['encoder.*']"]),
    "recipe-export-quantize": lambda e: (run(e, **{'to = ["onnx"]': 'to = ["onnx"]\nquantize = "int3"'}),
                                         ["'int3'", "'none', 'int8', 'int4'"]),
    "compress-share-group-other-method": lambda e: (["compress", MLP, "--rank", "2", "--share-group", "2", "-o", e.out],
                                                    ["--share-group", "shared-svd"]),
    "sweep-empty-ratios": lambda e: (["sweep", MLP, "--ratios", "", "--data", e.mlp_calib(), "--calib",
                                      e.mlp_calib()], ["--ratios ''", "empty"]),
    "sweep-ratio-range": lambda e: (["sweep", MLP, "--ratios", "0.5,1.5", "--data", e.mlp_calib(), "--calib",
                                     e.mlp_calib()], ["1.5", "(0, 1)"]),
    "sweep-ratio-zero": lambda e: (["sweep", MLP, "--ratios", "0", "--data", e.mlp_calib()], ["entry 0", "(0, 1)"]),
    "sweep-ratio-text": lambda e: (["sweep", MLP, "--ratios", "half", "--data", e.mlp_calib()], ["'half'", "not a number"]),
    "sweep-method": lambda e: (["sweep", MLP, "--ratios", "0.5", "--methods", "pca", "--data", e.mlp_calib()],
                               ["pca", "svd-whiten"]),
    "sweep-bytes-range": lambda e: (["sweep", MLP, "--ratios", "0.5", "--bytes", "0.1,2", "--data", e.mlp_calib(),
                                     "--calib", e.mlp_calib()], ["--bytes entry 2", "(0, 1)", "float32 bytes"]),
    "sweep-bytes-no-calib": lambda e: (["sweep", MLP, "--ratios", "0.5", "--methods", "svd", "--bytes", "0.2",
                                        "--data", e.mlp_calib()], ["--bytes", "--calib FILE"]),
    "sweep-quantize": lambda e: (["sweep", MLP, "--ratios", "0.5", "--quantize", "int3", "--data", e.mlp_calib()],
                                 ["int3", "none, int8, int4"]),
    "sweep-threads": lambda e: (["sweep", MLP, "--ratios", "0.5", "--threads", "0", "--data", e.mlp_calib(),
                                 "--calib", e.mlp_calib()], ["--threads 0"]),
    "sweep-no-calib": lambda e: (["sweep", MLP, "--ratios", "0.5", "--data", e.mlp_calib()], ["--calib"]),
    "budget-latency-zero": lambda e: (["compress", MLP, "-o", e.out, "--calib", e.mlp_calib(), "--budget", "latency=0"],
                                      ["latency=0.0", "(0, 1]"]),
    "budget-latency-above-one": lambda e: (["compress", MLP, "-o", e.out, "--calib", e.mlp_calib(), "--budget",
                                            "latency=1.5"], ["latency=1.5", "(0, 1]"]),
    "budget-latency-negative": lambda e: (["compress", MLP, "-o", e.out, "--budget", "latency=-0.2"], ["latency=-0.2"]),
    "budget-kind": lambda e: (["compress", MLP, "-o", e.out, "--budget", "speed=2"], ["speed=2", "latency, bytes, ratio"]),
    "budget-and-ratio": lambda e: (["compress", MLP, "-o", e.out, "--budget", "latency=0.5", "--ratio", "0.5"],
                                   ["contradicts --ratio"]),
    "budget-latency-tucker": lambda e: (["compress", MLP, "-o", e.out, "--method", "tucker", "--budget", "latency=0.5"],
                                        ["svd or svd-whiten"]),
    "save-recipe-folder": lambda e: (["compress", MLP, "-o", e.out, "--rank", "4", "--save-recipe", e.inp],
                                     ["--save-recipe", "is a folder"]),
    "save-recipe-no-parent": lambda e: (["compress", MLP, "-o", e.out, "--rank", "4", "--save-recipe",
                                         e.path("no/such/r.toml")], ["does not exist"]),
    "suggest-recipe-no-calib": lambda e: (["inspect", MLP, "--suggest-recipe", e.path("s.toml")],
                                          ["--suggest-recipe needs --calib"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_workflow_user_error(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    e = Env(tmp_path)
    argv, contains = CASES[case](e)
    expect_user_error(argv, capsys, tmp_path, contains, out=e.out)


def test_good_recipe_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Positive control for the recipe cases: the unmodified recipe runs and writes everything."""
    from tests.conftest import run_main
    e = Env(tmp_path)
    code, _, err = run_main(run(e), capsys)
    assert code == 0, err
    assert {p.name for p in e.out.iterdir()} == {"model", "export", "recipe.toml", "report.json", "report.md"}
