"""Recipes (`lrcompress run`), --save-recipe round trips, per-layer rules, sweeps with the Pareto
front, and latency-aware planning, on toy models, the digits CNN and MiniLM."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lrcompress.cli import main
from lrcompress.errors import ConfigError
from lrcompress.workflow.recipe import load_recipe, parse_recipe
from lrcompress.workflow.recipe_write import dump_recipe
from tests.conftest import needs_minilm
from tests.conftest import trusted

ROOT = Path(__file__).resolve().parent.parent
MLP = "tests.models:tiny_mlp"
DIGITS = ROOT / "samples" / "digits"


def cli(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(trusted(argv))
    out, err = capsys.readouterr()
    return (exc.value.code or 0), out, err


def mlp_calib(tmp_path: Path, n: int = 64) -> Path:
    p = tmp_path / "calib.npy"
    np.save(p, np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32))
    return p


# ---------------------------------------------------------------- recipe text


@pytest.mark.parametrize("recipe", ["samples/minilm/recipe.toml", "samples/digits/recipe.toml"])
def test_sample_recipes_dump_round_trip(recipe: str, tmp_path: Path) -> None:
    r = load_recipe(ROOT / recipe)
    text = dump_recipe(r)
    (tmp_path / "r.toml").write_text(text)
    again = load_recipe(tmp_path / "r.toml")
    assert again == r
    assert dump_recipe(again) == text  # canonical: dumping is a fixed point


def test_rules_and_sections_parse_to_values() -> None:
    r = parse_recipe({"source": "m", "compress": {"ratio": 0.5, "scope": "model", "solver": "randomized",
                                                  "rules": [{"match": "fc1", "rank": 4},
                                                            {"match": "re:fc[0-9]", "dense": True}]},
                      "recovery": {"steps": 5, "lr": 1e-4, "data": "t.txt"},
                      "export": {"to": ["onnx", "ort"], "quantize": "int8"},
                      "data": {"eval": "e.txt"},
                      "validate": {"artifact": "ort", "max_cosine_drift": 0.1, "max_latency_ratio": 2}})
    assert r.compress.config.method.solver == "randomized" and r.compress.rules[0].rank == 4
    assert r.compress.rules[1].dense and r.recovery.config.steps == 5 and r.recovery.data == "t.txt"
    assert r.validate.gates == {"max_cosine_drift": 0.1, "max_latency_ratio": 2.0}
    from lrcompress.workflow.recipe import to_config
    cfg = to_config(r.compress)
    assert cfg.ratio == 0.5 and cfg.scope == "model" and cfg.method.solver == "randomized"
    rule_cfg = to_config(r.compress, r.compress.rules[0], ("fc1",))
    assert rule_cfg.rank == 4 and rule_cfg.ratio is None and rule_cfg.targets == ("fc1",)


# ---------------------------------------------------------------- --save-recipe and run


def test_save_recipe_reproduces_compress_byte_for_byte(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calib = mlp_calib(tmp_path)
    a, recipe = tmp_path / "a", tmp_path / "sub" / "r.toml"
    recipe.parent.mkdir()
    code, _, err = cli(["compress", MLP, "--calib", calib, "--ratio", "0.6", "--allocate", "global", "-o", a,
                        "--save-recipe", recipe, "-q"], capsys)
    assert code == 0, err
    text = recipe.read_text()
    assert 'calib = "../calib.npy"' in text  # relative to the recipe's folder
    code, _, err = cli(["run", recipe, "-o", tmp_path / "b", "-q"], capsys)
    assert code == 0, err
    for f in ("model.safetensors", "lrcompress.json"):
        assert (a / f).read_bytes() == (tmp_path / "b" / "model" / f).read_bytes(), f
    assert dump_recipe(load_recipe(recipe)) == text
    copy = load_recipe(tmp_path / "b" / "recipe.toml")  # the run's own copy, paths relative to its folder
    assert copy == load_recipe(recipe) and Path(copy.path(copy.data.calib)).resolve() == calib.resolve()
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    totals = report["compression"]["totals"]
    assert report["exit_code"] == 0 and totals["params_after"] < totals["params_before"]


def test_rules_first_match_wins_and_budgets_apply(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calib = mlp_calib(tmp_path)
    (tmp_path / "r.toml").write_text(f"""
source = "{MLP}"
[data]
calib = "{calib.name}"
[compress]
method = "svd-whiten"
rank = 3
[[compress.rules]]
match = "head"
dense = true
[[compress.rules]]
match = "fc*"
rank = 5
[[compress.rules]]
match = "fc2"
rank = 7
""")
    code, _, err = cli(["run", tmp_path / "r.toml", "-o", tmp_path / "o", "-q"], capsys)
    assert code == 2 and "rule #3" in err and "taken by rule #2" in err  # fc2 was claimed by 'fc*'
    text = (tmp_path / "r.toml").read_text().replace('match = "fc*"', 'match = "fc1"')
    (tmp_path / "r.toml").write_text(text)
    code, _, err = cli(["run", tmp_path / "r.toml", "-o", tmp_path / "o", "-q"], capsys)
    assert code == 0, err
    layers = json.loads((tmp_path / "o" / "model" / "lrcompress.json").read_text())["layers"]
    assert layers["fc1"]["rank"] == 5 and layers["fc2"]["rank"] == 7 and "head" not in layers


def test_digits_recipe_runs_and_gates_set_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = load_recipe(DIGITS / "recipe.toml")
    code, out, err = cli(["run", DIGITS / "recipe.toml", "-o", tmp_path / "ok"], capsys)
    assert code == 0, err
    ok = tmp_path / "ok"
    assert {p.name for p in ok.iterdir()} == {"model", "export", "recipe.toml", "report.json", "report.md"}
    assert (ok / "export" / "model.onnx").is_file() and (ok / "export" / "model.ort").is_file()
    rep = json.loads((ok / "report.json").read_text())
    v = rep["validation"]
    assert v["candidate"].endswith("model.ort") and {g["gate"] for g in v["gates"]} == set(recipe.validate.gates)
    assert all(g["status"] == "passed" for g in v["gates"])
    assert v["outputs"]["output"]["top1_agreement"] >= 0.95 and rep["compression"]["totals"]["ratio"] <= 0.5
    assert "| max_size_ratio | 0.75 |" in (ok / "report.md").read_text() and "## Validation" in out
    # the same recipe with an impossible gate: everything is written, exit code 1, stderr names the gate
    strict = tmp_path / "strict.toml"
    text = (DIGITS / "recipe.toml").read_text().replace("max_size_ratio = 0.75", "max_size_ratio = 0.01")
    strict.write_text(text.replace('"../digits_cnn.py:build"', f'"{DIGITS.parent / "digits_cnn.py"}:build"')
                      .replace('"digits_cnn.safetensors"', f'"{DIGITS / "digits_cnn.safetensors"}"')
                      .replace('"calib.npy"', f'"{DIGITS / "calib.npy"}"')
                      .replace('"test_x.npy"', f'"{DIGITS / "test_x.npy"}"'))
    code, _, err = cli(["run", strict, "-o", tmp_path / "strict", "-q"], capsys)
    assert code == 1 and "max_size_ratio" in err
    assert json.loads((tmp_path / "strict" / "report.json").read_text())["exit_code"] == 1


@needs_minilm
def test_minilm_recipe_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The shipped MiniLM recipe, on fewer sentences: folder, three artifacts, one report, gates."""
    text = (ROOT / "samples" / "minilm" / "recipe.toml").read_text()
    text = text.replace('"../calib.txt"', f'"{ROOT / "samples" / "calib.txt"}"').replace(
        '"../eval.txt"', f'"{ROOT / "samples" / "eval.txt"}"').replace("eval_samples = 200", "eval_samples = 16\ncalib_samples = 32")
    (tmp_path / "r.toml").write_text(text.replace("runs = 50", "runs = 5"))
    code, _, err = cli(["run", tmp_path / "r.toml", "-o", tmp_path / "o", "-q"], capsys)
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == rep["exit_code"] and code in (0, 1), err
    assert {r["target"] for r in rep["export"]} == {"onnx", "onnx-int8", "ort", "coreml"}
    out = rep["validation"]["outputs"]["last_hidden_state"]
    assert out["cos_mean"] > 0.9 and rep["validation"]["latency"]["candidate"]["p50_ms"] > 0
    assert abs(rep["compression"]["totals"]["ratio"] - 0.75) < 0.01


# ---------------------------------------------------------------- sweep


def test_pareto_marks_only_undominated_points() -> None:
    from lrcompress.workflow.sweep import pareto
    pts = [{"bytes": b, "drift": d} for b, d in [(10, 0.0), (5, 0.1), (6, 0.2), (3, 0.3), (3, 0.25), (8, 0.05),
                                                  (1000, 0.5), (1001, 0.1)]]
    pareto(pts)
    # the last two: 1001 bytes is "the same size" as 1000 (0.5 % tolerance) with less drift, so it wins;
    # both lose to the 10-byte point anyway, which shows dominance is on both axes
    assert [p["pareto"] for p in pts] == [True, True, False, False, True, True, False, False]
    same = [{"bytes": 1000, "drift": 0.5}, {"bytes": 1003, "drift": 0.1}]
    pareto(same)
    assert [p["pareto"] for p in same] == [False, True]


def test_sweep_cli_table_json_plot(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    calib = mlp_calib(tmp_path)
    held = tmp_path / "held.npy"
    np.save(held, np.random.default_rng(5).standard_normal((40, 32)).astype(np.float32))
    code, out, err = cli(["sweep", MLP, "--calib", calib, "--data", held, "--ratios", "0.5,0.8",
                          "--methods", "svd-whiten,svd", "--quantize", "none,int8", "--runs", "3",
                          "--plot", tmp_path / "p.png", "--json", tmp_path / "p.json", "-q"], capsys)
    assert code == 0, err
    pts = json.loads((tmp_path / "p.json").read_text())
    assert len(pts) == 2 + 2 * 2 * 2  # original and int8-only, then ratio x method x quantization
    orig = next(p for p in pts if p["label"] == "original")
    assert orig["cos_mean"] > 0.99999 and orig["pareto"]
    for p in pts:  # the marks follow the definition (sizes within 0.5 % are equal)
        assert not any(q["bytes"] <= p["bytes"] * 1.005 and q["drift"] <= p["drift"] and
                       (q["drift"] < p["drift"] or q["bytes"] < p["bytes"] * 0.995) for q in pts if q is not p) == p["pareto"]
    for ratio in (0.5, 0.8):  # whitened SVD is never worse than plain SVD on the calibration distribution
        w = next(p for p in pts if p["method"] == "svd-whiten" and p["ratio"] == ratio and p["quantize"] == "none")
        assert w["params"] <= ratio * orig["params"] + 1
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert not list(scratch.glob("lrcompress-sweep-*"))  # without --keep the exported points are removed


# ---------------------------------------------------------------- latency-aware planning


class Wide(torch.nn.Module):
    """Two wide Linear layers and an embedding: matmuls dominate the latency."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(1000, 256)
        self.up = torch.nn.Linear(256, 1024)
        self.down = torch.nn.Linear(1024, 256)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(input_ids))))


@pytest.mark.parametrize("int8", [False, True])
def test_latency_budget_plan_meets_prediction(int8: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lrcompress.config import CompressConfig
    from lrcompress.io.data import TensorData
    from lrcompress.workflow.pipeline import plan
    monkeypatch.setenv("LRCOMPRESS_CACHE", str(tmp_path))
    ids = np.random.default_rng(0).integers(1, 1000, size=(32, 64)).astype(np.int64)
    data = TensorData({"input_ids": ids, "attention_mask": np.ones_like(ids)}, "ids")
    cfg = CompressConfig(latency=0.6, latency_seq=64, latency_batch=4, probe_passes=1, latency_int8=int8)
    p = plan(Wide().eval(), cfg, data)
    lat = p.latency
    assert lat is not None and lat["predicted_ms"] <= lat["budget_ms"] + 1e-6 and lat["int8"] == int8
    if int8:  # timed on the quantized export, budget still a fraction of the fp32 original
        assert "original_int8_ms" in lat
        keys = json.loads((tmp_path / "latency.json").read_text())
        assert all("int8=True" in k for k in keys)
    assert lat["budget_ms"] == pytest.approx(0.6 * lat["original_ms"], rel=1e-3)
    by = {l.name: l for l in p.layers}
    assert by["embed"].rank is None and ("not faster" in by["embed"].reason or "met" in by["embed"].reason)
    if not int8:  # fp32: the original is over budget, so the branch below must run
        assert lat["original_ms"] > lat["budget_ms"]
    if lat.get("original_int8_ms", lat["original_ms"]) > lat["budget_ms"]:  # something had to be factorized
        assert by["up"].rank is not None or by["down"].rank is not None
    assert (tmp_path / "latency.json").is_file()  # per-layer costs cached


def test_latency_budget_is_validated() -> None:
    from lrcompress.config import CompressConfig, method_config
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="latency"):
            CompressConfig(latency=bad)
    with pytest.raises(ConfigError, match="exactly one"):
        CompressConfig(latency=0.5, ratio=0.5)
    with pytest.raises(ConfigError, match="svd or svd-whiten"):
        CompressConfig(latency=0.5, method=method_config("tucker"))


# ---------------------------------------------------------------- inspect suggests a recipe


def test_inspect_suggests_a_recipe_that_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calib = mlp_calib(tmp_path)
    out = tmp_path / "suggested.toml"
    code, stdout, err = cli(["inspect", MLP, "--calib", calib, "--ratio", "0.5", "--suggest-recipe", out], capsys)
    assert code == 0, err and f"wrote {out}" in stdout
    r = load_recipe(out)
    assert r.compress is not None and r.compress.rules and all(rule.rank or rule.dense for rule in r.compress.rules)
    code, _, err = cli(["run", out, "-o", tmp_path / "o", "-q"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["compression"]["totals"]["params_after"] <= 0.5 * rep["compression"]["totals"]["params_before"] * 1.05
    shutil.rmtree(tmp_path / "o")
    code, stdout, err = cli(["inspect", MLP, "--calib", calib, "--ratio", "0.5", "--suggest-recipe", "-"], capsys)
    import tomllib
    assert code == 0, err
    printed = parse_recipe(tomllib.loads(stdout))
    assert [(x.match, x.rank, x.dense) for x in printed.compress.rules] == [(x.match, x.rank, x.dense) for x in r.compress.rules]


def test_readme_recipe_reference_is_generated() -> None:
    from lrcompress.workflow.recipe_doc import BEGIN, END, reference
    text = (ROOT / "README.md").read_text()
    assert text.split(BEGIN)[1].split(END)[0].strip() == reference().strip()


def test_readme_recipe_example_parses() -> None:
    """The README's recipe example is a valid recipe."""
    import tomllib
    text = (ROOT / "README.md").read_text()
    block = text.split("```toml\n")[1].split("```")[0]
    r = parse_recipe(tomllib.loads(block))
    assert r.compress.rules[0].ratio == 0.8 and r.compress.rules[1].dense and r.validate.artifact == "ort"


def test_recipe_with_recovery_records_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calib = mlp_calib(tmp_path, n=96)
    (tmp_path / "r.toml").write_text(f"""
source = "{MLP}"
[data]
calib = "{calib.name}"
[compress]
ratio = 0.5
[recovery]
steps = 6
batch_size = 8
eval_every = 3
lr = 0.001
""")
    code, _, err = cli(["run", tmp_path / "r.toml", "-o", tmp_path / "o", "-q"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    rec = rep["compression"]["recovery"]
    assert rec["steps"] == 6 and rec["after_fold"]["loss"] <= rec["before"]["loss"] + 1e-9
    assert (tmp_path / "o" / "model" / "recovery.json").is_file()
    from lrcompress import load
    model, _ = load(tmp_path / "o" / "model", trust_code=True)
    assert sum(p.numel() for p in model.parameters()) == rep["compression"]["totals"]["params_after"]
