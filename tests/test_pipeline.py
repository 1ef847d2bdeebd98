"""Planner, calibration, save/load and the CLI on toy models (fast) and MiniLM (real)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import lrcompress as lc
from lrcompress.calibration.calibrate import calibrate
from lrcompress.io.data import Batch
from lrcompress.methods.layers import LowRankEmbedding, LowRankLinear
from lrcompress.planning.make_plan import break_even_rank, make_plan
from tests.conftest import ROOT, SAMPLES, needs_minilm
from tests.models import tiny_mlp, tiny_token_model


def _mlp_data(n: int = 256) -> lc.TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, 32, generator=g) + 0.05 * torch.randn(n, 32, generator=g)
    return lc.TensorData({"": x.numpy()})


def test_gram_ignores_padding():
    model = tiny_token_model()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = ids != 0
    stats = calibrate(model, [Batch({"input_ids": ids, "attention_mask": mask.long()}, mask)], ["embed", "proj"])
    x = model.embed(ids)[mask].double()
    assert torch.allclose(stats.layers["proj"].gram, x.T @ x)
    assert stats.layers["proj"].rows == 5
    counts = stats.layers["embed"].counts
    assert counts[0] == 0 and counts[5] == 1 and counts.sum() == 5


def test_shared_input_layers_get_their_own_correct_gram():
    """q/k/v style sharing is cached, but a different tensor never reuses another's Gram."""
    model = tiny_mlp()
    data = _mlp_data(64)
    stats = calibrate(model, data.batches(16), ["fc1", "fc2", "head"])
    x = torch.from_numpy(data.arrays["input"]).float()
    with torch.no_grad():
        h1 = model.act(model.fc1(x))
        h2 = model.act(model.fc2(h1))
    for name, inp in (("fc1", x), ("fc2", h1), ("head", h2)):
        ref = inp.double().T @ inp.double()
        assert torch.allclose(stats.layers[name].gram, ref, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_uniform_ranks_follow_the_formula(ratio):
    model = tiny_mlp()
    cfg = lc.CompressConfig(method=lc.SVDConfig(), ratio=ratio, allocate="uniform")
    plan = make_plan(model, cfg)
    for lp in plan.layers:
        m, n = lp.shape
        r = max(1, math.floor(ratio * m * n / (m + n)))
        if r < break_even_rank(m, n):
            assert lp.rank == r
            assert lp.params_after == r * (m + n)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.7])
def test_global_allocation_meets_budget_and_beats_uniform_objective(ratio):
    model = tiny_mlp()
    stats = lc.gather(model, lc.CompressConfig(ratio=0.5), _mlp_data())
    plans = {a: make_plan(model, lc.CompressConfig(ratio=ratio, allocate=a), stats) for a in ("uniform", "global")}
    budget = ratio * sum(lp.params_before for lp in plans["global"].layers)
    g = plans["global"]
    assert sum(lp.params_after for lp in g.layers) <= budget + 1e-9
    def loss(p):
        return sum((lp.predicted_error ** 2) for lp in p.layers)
    assert loss(g) <= loss(plans["uniform"]) + 1e-12


def test_never_factorizes_at_or_past_break_even():
    model = tiny_mlp()
    for rank in (1, 5, 9, 10):
        plan = make_plan(model, lc.CompressConfig(method=lc.SVDConfig(), rank=rank))
        for lp in plan.layers:
            m, n = lp.shape
            if lp.rank is not None:
                assert lp.rank * (m + n) < m * n
            else:
                assert rank * (m + n) >= m * n and "break-even" in lp.reason


def test_energy_budget_keeps_the_energy():
    model = tiny_mlp()
    stats = lc.gather(model, lc.CompressConfig(ratio=0.5), _mlp_data())
    plan = make_plan(model, lc.CompressConfig(energy=0.9), stats)
    assert any(lp.rank is not None for lp in plan.layers)  # the loop below checks factorized layers
    for lp in plan.layers:
        if lp.rank is not None:
            spec = plan.spectra[lp.name]
            kept = float(spec.s2[: lp.rank].sum()) / spec.total
            assert kept >= 0.9 - 1e-9
            assert float(spec.s2[: lp.rank - 1].sum()) / spec.total < 0.9


def test_compress_copy_leaves_original_and_reports_optimum():
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, rep = lc.compress(model, lc.CompressConfig(ratio=0.5, allocate="uniform"), _mlp_data())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(small.fc1, LowRankLinear)
    assert rep.params_after < rep.params_before
    assert rep.worst_error_ratio <= 1.005
    # measured output error on the calibration data equals the reported one
    x = torch.from_numpy(_mlp_data().arrays["input"])
    with torch.no_grad():
        y, yhat = model.fc1(x).double(), small.fc1(x).double()
    bias = model.fc1.bias.double()
    rel = float(((y - yhat).norm() / (y - bias).norm()).detach())
    fc1 = next(l for l in rep.layers if l.name == "fc1")
    assert rel == pytest.approx(fc1.relative_error, rel=1e-4)


def test_embedding_factorization_is_frequency_weighted(token_inputs):
    model = tiny_token_model()
    data = lc.open_data(token_inputs, None)
    small, rep = lc.compress(model, lc.CompressConfig(rank=6, targets=("embed",)), data)
    assert isinstance(small.embed, LowRankEmbedding)
    assert small.embed.padding_idx == 0
    lay = rep.layers[0]
    assert lay.error_ratio == pytest.approx(1.0, abs=1e-3)
    plain, rp = lc.compress(model, lc.CompressConfig(method=lc.SVDConfig(), rank=6, targets=("embed",)), data)
    assert lay.relative_error < rp.layers[0].relative_error


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = lc.CompressConfig(ratio=0.5)
    loaded = lc.resolve("tests.models:tiny_mlp")
    lc.compress_(loaded.model, cfg, _mlp_data())
    out = lc.save(loaded.model, tmp_path / "out", loaded.spec)
    again, tok = lc.load(out, trust_code=True)
    assert tok is None
    x = torch.randn(7, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), again(x))
    manifest = json.loads((out / "lrcompress.json").read_text())
    assert manifest["format"] == "lrcompress/1" and manifest["source"]["target"] == "tests.models:tiny_mlp"
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_compress_toy_and_reload(tmp_path, mlp_inputs):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "lrcompress", "compress", "tests.models:tiny_mlp", "--calib",
                        str(mlp_inputs), "--ratio", "0.5", "-o", str(out), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["totals"]["worst_error_ratio"] <= 1.005
    assert rep["totals"]["params_after"] < rep["totals"]["params_before"]
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    dry = subprocess.run([sys.executable, "-m", "lrcompress", "compress", "tests.models:tiny_mlp", "--calib",
                          str(mlp_inputs), "--ratio", "0.5", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and "fc1" in dry.stdout and "pred.err" in dry.stdout


def test_inspect_reports_break_even_and_energy_ranks(mlp_inputs):
    model = tiny_mlp()
    stats = lc.gather(model, lc.CompressConfig(ratio=0.5), lc.open_data(mlp_inputs, None))
    rep = lc.inspect(model, stats, ratio=0.5)
    fc1 = next(l for l in rep.layers if l.name == "fc1")
    assert fc1.break_even == break_even_rank(64, 32)
    assert fc1.whitened and 1 <= fc1.rank90 <= fc1.rank99 <= 32
    # inputs live in ~8 dimensions: 99 % of the whitened energy needs few ranks
    assert fc1.rank99 <= 10


@needs_minilm
def test_minilm_cli_compress_is_optimal_reloadable_and_deterministic(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join((SAMPLES / "calib.txt").read_text().splitlines()[:64]) + "\n")
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        r = subprocess.run([sys.executable, "-m", "lrcompress", "compress", "minilm", "--calib", str(calib),
                            "--max-length", "128", "--method", "svd-whiten", "--ratio", "0.5", "-o", str(out),
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        outs.append((out, json.loads(r.stdout)))
    (o1, rep), (o2, _) = outs
    assert (o1 / "model.safetensors").read_bytes() == (o2 / "model.safetensors").read_bytes()
    fact = [l for l in rep["layers"] if l["rank"] is not None]
    assert fact and all(l["error_ratio"] <= 1.005 for l in fact)
    assert rep["totals"]["params_after"] < rep["totals"]["params_before"]
    model, tok = lc.load(o1, trust_code=True)
    assert tok is not None
    orig = lc.resolve("minilm")
    small = orig.model
    lc.compress_(small, lc.CompressConfig.from_dict(rep["config"]),
                 lc.TextData(calib.read_text().splitlines(), orig.tokenizer, 128))
    enc = tok(["Low-rank factors keep the model small.", "A second sentence."], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        a = model(**enc).last_hidden_state
        b = small(**enc).last_hidden_state
    assert torch.equal(a, b)
    assert (o1 / "tokenizer.json").is_file() and (o1 / "config.json").is_file()


def test_global_allocation_weights_layers_by_measured_sensitivity():
    from tests.models import two_branch
    model = two_branch()
    g = torch.Generator().manual_seed(2)
    data = lc.TensorData({"": torch.randn(128, 32, generator=g).numpy()})
    stats = lc.gather(model, lc.CompressConfig(ratio=0.5), data)
    assert stats.probe
    flat = make_plan(model, lc.CompressConfig(ratio=0.4, probe_passes=0), stats)
    ranks = {l.name: l.rank for l in flat.layers}
    assert ranks["loud"] == ranks["quiet"]  # identical spectra: the unweighted objective splits evenly
    aware = make_plan(model, lc.CompressConfig(ratio=0.4), stats)
    lay = {l.name: l for l in aware.layers}
    assert lay["loud"].sensitivity > 100 * lay["quiet"].sensitivity
    assert (lay["loud"].rank or 32) > (lay["quiet"].rank or 0)
    budget = 0.4 * sum(l.params_before for l in aware.layers)
    assert sum(l.params_after for l in aware.layers) <= budget


def test_pointwise_convs_use_whitened_svd_and_keep_stride_padding_bias(tmp_path):
    from lrcompress.methods.layers import LowRankConv1x1
    loaded = lc.resolve("tests.models:pointwise_net")
    model = loaded.model
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 3, 9, 9, generator=g)
    data = lc.TensorData({"": x.numpy()})
    ref = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: ref.__setitem__(n, (a[0], o)))
             for n in ("pw1", "pw2")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    report = lc.compress_(model, lc.CompressConfig(rank=8, targets=("pw1", "pw2")), data)
    assert isinstance(model.pw1, LowRankConv1x1) and model.pw1.first.stride == (2, 2)
    assert model.pw1.first.padding == (1, 1) and model.pw2.second.bias is None
    for lay in report.layers:
        assert lay.error_ratio == pytest.approx(1.0, abs=1e-3)
        inp, out = ref[lay.name]
        with torch.no_grad():
            got = model.get_submodule(lay.name)(inp)
        bias = model.get_submodule(lay.name).second.bias
        base = out - (bias[None, :, None, None] if bias is not None else 0)
        rel = float((got - out).norm() / base.norm().detach())
        assert rel == pytest.approx(lay.relative_error, rel=1e-3)
    out_dir = lc.save(model, tmp_path / "pw", loaded.spec)
    again, _ = lc.load(out_dir, trust_code=True)
    with torch.no_grad():
        assert torch.equal(model(x[:3]), again(x[:3]))
