"""LoRA residual recovery: adapter maths (residual init, folding), training, resume, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lrcompress
from lrcompress.config import RecoveryConfig
from lrcompress.io.data import TensorData, read_tensors
from lrcompress.methods.layers import LowRankConv1x1, LowRankEmbedding, LowRankLinear
from lrcompress.recovery.lora import LoRA, balance, factors, fold, residual_chunk
from lrcompress.decompose.lowrank import Metric, factorize, spectrum
from lrcompress.recovery.train import per_example_loss, recover
from tests.conftest import ROOT, needs_minilm
from tests.models import tiny_token_model
from tests.conftest import run_main

TINY = "tests.models:tiny_token_model"


def _gram(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, n, generator=g, dtype=torch.float64)
    x = x + 0.1 * torch.randn(400, n, generator=g, dtype=torch.float64)
    return x.T @ x


def _lowrank_linear(w: torch.Tensor, metric: Metric, r: int) -> LowRankLinear:
    f = factorize(w, spectrum(w, metric), r, metric)
    return LowRankLinear.from_factors(f.a.double(), f.b.double(), None)


def test_residual_init_equals_higher_rank_truncation():
    """W' + (top-l whitened residual directions) is exactly the rank r+l whitened optimum."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 16, generator=g, dtype=torch.float64)
    metric = Metric(gram=_gram(16))
    lin = _lowrank_linear(w, metric, 5)
    a, b = factors(lin)
    u, d = residual_chunk(w - a @ b, 3, metric)
    start = a @ b + u @ d
    best = factorize(w, spectrum(w, metric), 8, metric)
    torch.testing.assert_close(start, best.a.double() @ best.b.double(), atol=1e-9, rtol=1e-9)
    # and its whitened error is the theoretical minimum at rank 8
    err = metric.sqnorm(w - start) ** 0.5
    assert err == pytest.approx(spectrum(w, metric).tail(8) ** 0.5, rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "embedding"])
def test_exact_fold_matches_adapter_outputs(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = LowRankLinear(12, 10, 3), torch.randn(4, 7, 12)
    elif kind == "conv1x1":
        conv = nn.Conv2d(12, 10, 1, stride=2, padding=1)
        base = LowRankConv1x1.from_factors(torch.randn(10, 3), torch.randn(3, 12), conv)
        x = torch.randn(2, 12, 5, 5)
    else:
        base, x = LowRankEmbedding(30, 8, 3, padding_idx=0), torch.randint(0, 30, (3, 9))
    lora = LoRA(copy.deepcopy(base))
    a, b = factors(base)
    lora.grow(torch.randn(a.shape[0], 2, dtype=torch.float64), torch.randn(2, b.shape[1], dtype=torch.float64))
    lora.grow(torch.randn(a.shape[0], 1, dtype=torch.float64), torch.randn(1, b.shape[1], dtype=torch.float64))
    with torch.no_grad():
        want = lora(x)
        folded = fold(lora)
        got = folded(x)
    assert type(folded) is type(base)
    assert folded.rank == 6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if kind == "embedding":
        assert folded.padding_idx == 0


def test_budget_fold_is_the_metric_optimal_truncation():
    """Re-truncating [A, U][B; D] to rank r without forming W gives the whitened optimum of the
    dense sum at rank r."""
    g = torch.Generator().manual_seed(5)
    metric = Metric(gram=_gram(14, 1))
    base = LowRankLinear.from_factors(torch.randn(11, 4, generator=g, dtype=torch.float64),
                                      torch.randn(4, 14, generator=g, dtype=torch.float64), None)
    lora = LoRA(base)
    lora.grow(torch.randn(11, 3, generator=g, dtype=torch.float64), torch.randn(3, 14, generator=g, dtype=torch.float64))
    a, b = factors(base)
    u, d = (t.detach() for t in lora.delta())
    dense = a @ b + u.double() @ d.double()
    folded = fold(lora, rank=4, metric=metric)
    fa, fb = factors(folded)
    achieved = metric.sqnorm(dense - fa @ fb) ** 0.5
    optimum = spectrum(dense, metric).tail(4) ** 0.5
    assert folded.rank == 4
    assert achieved == pytest.approx(optimum, rel=1e-7)
    # balanced gauge on the way out
    torch.testing.assert_close(fa.T @ fa, fb @ fb.T, atol=1e-8, rtol=1e-8)


def test_balance_keeps_product_and_balances():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64) * 100
    b = torch.randn(4, 13, generator=g, dtype=torch.float64) / 100
    a2, b2 = balance(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b, atol=1e-10, rtol=1e-10)
    ata, bbt = a2.T @ a2, b2 @ b2.T
    torch.testing.assert_close(ata, bbt, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ata, torch.diag(torch.diagonal(ata)), atol=1e-10, rtol=1e-10)


def test_loss_is_zero_at_teacher_and_ignores_padding():
    torch.manual_seed(0)
    t = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    terms = ("hidden", "pooled")
    assert per_example_loss(t, t, mask, terms).abs().max() < 1e-6
    s = t.clone()
    s[1, 3:] += 100.0  # padding positions only
    assert per_example_loss(s, t, mask, terms).abs().max() < 1e-6
    s[0, 0] += 1.0
    loss = per_example_loss(s, t, mask, terms)
    assert loss[0] > 1e-3 and loss[1:].abs().max() < 1e-6


# ---------------------------------------------------------------- training on the toy token model


def _toy(token_inputs: Path, ratio: float = 0.4) -> tuple[nn.Module, nn.Module, TensorData]:
    teacher = tiny_token_model().eval()
    data = read_tensors(token_inputs)
    cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=ratio, probe_passes=0)
    student, _ = lrcompress.compress(teacher, cfg, data)
    return student, teacher, data


def _has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRA) for m in model.modules())


@pytest.mark.parametrize("train,fold_mode,lr", [("factors", "budget", 3e-3), ("both", "budget", 3e-3),
                                                ("lora", "exact", 2e-2)])
def test_recovery_improves_held_out_and_folds(token_inputs, train, fold_mode, lr):
    student, teacher, data = _toy(token_inputs)
    params = sum(p.numel() for p in student.parameters())
    rc = RecoveryConfig(steps=60, lr=lr, train=train, fold=fold_mode, lora_rank=2, batch_size=8, eval_every=20,
                        patience=0)
    rep = recover(student, teacher, data, rc)
    assert not _has_lora(student)
    assert rep.best["loss"] < 0.8 * rep.before["loss"]
    assert rep.after_fold["cos_mean"] > rep.before["cos_mean"]
    if fold_mode == "budget":
        assert rep.params_after == params
    else:  # each two-factor layer gains lora_rank * (out + in) params
        names = [n for n, m in student.named_modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))]
        assert names and rep.params_after > params
        assert rep.after_fold["loss"] == pytest.approx(rep.best["loss"], rel=1e-4, abs=1e-6)


def test_residual_init_starts_ahead_of_zero_init(token_inputs):
    student, teacher, data = _toy(token_inputs)
    reps = {}
    for init in ("residual", "zero"):
        rc = RecoveryConfig(steps=1, lr=1e-9, train="lora", init=init, fold="exact", lora_rank=3, batch_size=8,
                            eval_every=1, patience=0)
        reps[init] = recover(copy.deepcopy(student), teacher, data, rc)
    # same student before; the residual adapters start at the rank r + 3 optimum, zero init at W'
    assert reps["residual"].before == reps["zero"].before
    torch.testing.assert_close(reps["zero"].start["loss"], reps["zero"].before["loss"])
    assert reps["residual"].start["loss"] < 0.9 * reps["zero"].start["loss"]


def test_recovery_is_deterministic(token_inputs):
    student, teacher, data = _toy(token_inputs)
    rc = RecoveryConfig(steps=15, lr=3e-3, train="both", lora_rank=2, batch_size=8, eval_every=5, patience=0)
    s1, s2 = copy.deepcopy(student), copy.deepcopy(student)
    recover(s1, teacher, data, rc)
    recover(s2, teacher, data, rc)
    for (n, a), (_, b) in zip(s1.state_dict().items(), s2.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_after_interruption_matches_uninterrupted(token_inputs, tmp_path):
    student, teacher, data = _toy(token_inputs)
    rc = RecoveryConfig(steps=24, lr=3e-3, train="both", lora_rank=2, batch_size=8, eval_every=5, patience=0,
                        rank_schedule=((7, 3), (9, 4)))
    straight = copy.deepcopy(student)
    recover(straight, teacher, data, rc)
    state = tmp_path / "state.pt"

    def interrupt(step, info):
        if step == 13:
            raise KeyboardInterrupt

    first = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        recover(first, teacher, data, rc, state_path=state, progress=interrupt)
    assert state.is_file()
    resumed = copy.deepcopy(student)
    rep = recover(resumed, teacher, data, rc, state_path=state, resume=True)
    assert rep.steps == 24
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_rank_schedule_grows_adapters(token_inputs):
    student, teacher, data = _toy(token_inputs)
    ranks = {n: m.rank for n, m in student.named_modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))}
    rc = RecoveryConfig(steps=10, lr=1e-3, train="lora", lora_rank=1, fold="exact", batch_size=8, eval_every=5,
                        patience=0, rank_schedule=((4, 3),))
    recover(student, teacher, data, rc)
    for n, r in ranks.items():
        assert student.get_submodule(n).rank == r + 3


def test_nan_loss_keeps_last_good_state(token_inputs, tmp_path):
    from lrcompress.errors import TrainingError
    student, teacher, data = _toy(token_inputs)
    rc = RecoveryConfig(steps=30, lr=1e30, train="factors", batch_size=8, eval_every=50, patience=0, clip=1e30)
    before = copy.deepcopy(student.state_dict())
    state = tmp_path / "s.pt"
    with pytest.raises(TrainingError, match="NaN"):
        recover(student, teacher, data, rc, state_path=state)
    assert state.is_file()
    blob = torch.load(state, weights_only=True)
    for k, v in before.items():  # the last good state is the untrained student (re-balanced)
        torch.testing.assert_close(blob["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------- CLI


def test_cli_compress_with_recovery_and_recover_folder(tmp_path, token_inputs, capsys):
    src = "tests.models:tiny_token_model"
    out = tmp_path / "c"
    code, stdout, err = run_main(["compress", src, "--calib", str(token_inputs), "--ratio", "0.4", "-o", str(out),
                                  "--recover-steps", "30", "--recover-batch-size", "8", "--lr", "3e-3",
                                  "--eval-every", "10", "--train", "both", "--lora-rank", "2", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["recovery"]["steps"] == 30
    assert rep["recovery"]["after_fold"]["loss"] < rep["recovery"]["before"]["loss"]
    assert (out / "recovery.json").is_file() and not (tmp_path / "c.recover-state.pt").exists()
    model, _ = lrcompress.load(out, trust_code=True)
    assert not _has_lora(model)
    assert rep["totals"]["params_after"] == sum(p.numel() for p in model.parameters())

    out2 = tmp_path / "r"
    code, stdout, err = run_main(["recover", str(out), "--reference", src, "--data", str(token_inputs),
                                  "-o", str(out2), "--steps", "20", "--batch-size", "8", "--lr", "3e-3",
                                  "--eval-every", "10", "--fold", "exact", "--train", "lora", "--lora-rank", "2",
                                  "--plot", str(tmp_path / "curve.png"), "--json"], capsys)
    assert code == 0, err
    rec = json.loads(stdout)
    model2, _, manifest = lrcompress.load(out2, with_manifest=True, trust_code=True)
    assert not _has_lora(model2)
    ranks1 = {n: i["rank"] for n, i in json.loads((out / "lrcompress.json").read_text())["layers"].items()}
    assert {n: i["rank"] for n, i in manifest["layers"].items()} == {n: r + 2 for n, r in ranks1.items()}
    assert rec["params_after"] == sum(p.numel() for p in model2.parameters())
    assert (tmp_path / "curve.png").stat().st_size > 1000
    summary = json.loads((out2 / "report.json").read_text())
    assert summary["compression"]["totals"]["params_after"] == rep["totals"]["params_after"]


def _compressed(tmp_path: Path, token_inputs: Path, capsys) -> Path:
    ck = tmp_path / "c"
    code, _, err = run_main(["compress", TINY, "--calib", str(token_inputs), "--ratio", "0.4", "-o", str(ck), "-q"],
                            capsys)
    assert code == 0, err
    return ck


def _torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    """``lrcompress ARGS`` on two torchrun processes (one thread each)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port + os.getpid() % 1000), "-m", "lrcompress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_match_single_process(tmp_path, token_inputs, capsys):
    ck = _compressed(tmp_path, token_inputs, capsys)
    common = ["recover", str(ck), "--reference", TINY, "--data", str(token_inputs), "--steps", "12",
              "--batch-size", "8", "--lr", "3e-3", "--eval-every", "4", "--train", "both", "--lora-rank", "2", "-q", "--trust-code"]
    code, _, err = run_main(common + ["-o", str(tmp_path / "one")], capsys)
    assert code == 0, err
    proc = _torchrun([*common, "-o", str(tmp_path / "two")], 29500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, _ = lrcompress.load(tmp_path / "one", trust_code=True)
    two, _ = lrcompress.load(tmp_path / "two", trust_code=True)
    for (n, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=n)
    assert not (tmp_path / "two.recover-state.pt").exists()
    assert json.loads((tmp_path / "two" / "recovery.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "recovery.json").read_text())["world_size"] == 1
    assert "terminate called" not in proc.stderr


def test_torchrun_bad_input_exits_2_on_every_rank_and_writes_nothing(tmp_path, token_inputs, capsys):
    ck = _compressed(tmp_path, token_inputs, capsys)
    proc = _torchrun(["recover", str(ck), "--reference", TINY, "--data", str(token_inputs), "--steps", "4",
                      "--batch-size", "7", "-q", "--trust-code", "-o", str(tmp_path / "two")], 28500)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("lrcompress: error:")]
    # torchrun may stop the slower rank before it reports; every rank that reports says the same line
    assert errors and set(errors) == {"lrcompress: error: --batch-size 7 is not divisible by the 2 processes; "
                                      "use a multiple of 2"}
    assert "(exitcode: 2)" in proc.stderr and "terminate called" not in proc.stderr
    assert not (tmp_path / "two").exists()


def test_shutdown_destroys_the_process_group_and_is_a_no_op_without_one(tmp_path):
    # a gloo group left alive at interpreter exit can abort the process; the CLI tears it down
    import torch.distributed as dist

    from lrcompress.io.distributed import all_sum, shutdown
    shutdown()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert all_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
        shutdown(sync=True)
        assert not dist.is_initialized()
        shutdown(sync=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@needs_minilm
def test_minilm_recovery_improves_held_out_cosine(tmp_path, capsys):
    from lrcompress.io.data import TextData, read_lines
    loaded = lrcompress.resolve("minilm")
    lines = read_lines(ROOT / "samples" / "train.txt")
    held = read_lines(ROOT / "samples" / "eval.txt")[:64]
    tok = loaded.tokenizer
    cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=0.5, scope="model",
                                    probe_passes=0)
    student, _ = lrcompress.compress(loaded.model, cfg, TextData(lines[:64], tok, 64))
    rc = RecoveryConfig(steps=30, lr=1e-4, batch_size=8, max_length=64, eval_every=15, patience=0)
    rep = recover(student, loaded.model, TextData(lines[:240], tok, 64), rc, eval_data=TextData(held, tok, 64))
    assert rep.after_fold["cos_mean"] > rep.before["cos_mean"] + 0.01
    assert rep.params_after == rep.params_before


def test_ortho_penalty_zero_for_svd_factors_positive_after_rotation():
    from lrcompress.recovery.train import ortho_penalty
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 12, generator=g, dtype=torch.float64)
    lin = _lowrank_linear(w, Metric(), 4)
    model = nn.Sequential(lin)
    assert float(ortho_penalty(model).detach()) < 1e-20
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    with torch.no_grad():  # same product, rotated gauge: the bases are no longer orthogonal
        lin.second.weight.copy_(lin.second.weight @ (q * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)))
        lin.first.weight.copy_(torch.linalg.solve(q * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64),
                                                  lin.first.weight))
    torch.testing.assert_close(lin.second.weight @ lin.first.weight, factors(_lowrank_linear(w, Metric(), 4))[0]
                               @ factors(_lowrank_linear(w, Metric(), 4))[1])
    assert float(ortho_penalty(model).detach()) > 1e-3


@pytest.mark.parametrize("extra", [{"feature_weight": 1.0}, {"ortho_weight": 0.1}, {"bf16": True},
                                   {"loss": ("hidden",)}, {"train": "all"}])
def test_recovery_options_train(token_inputs, extra):
    student, teacher, data = _toy(token_inputs)
    rc = RecoveryConfig(steps=40, lr=3e-3, batch_size=8, eval_every=20, patience=0, **extra)
    rep = recover(student, teacher, data, rc)
    assert rep.after_fold["loss"] < 0.9 * rep.before["loss"]
    assert rep.steps == 40


def test_replace_tokens_keeps_specials_and_padding():
    from lrcompress.io.data import Batch
    from lrcompress.recovery.train import replace_tokens

    class Tok:
        all_special_ids = [0, 101, 102]
        vocab_size = 1000

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 1000, (8, 50), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(8, 50, dtype=torch.bool)
    mask[::2, 30:] = False
    ids[~mask] = 0
    b = Batch({"input_ids": ids, "attention_mask": mask.long()}, mask)
    out = replace_tokens(b, Tok(), 0.25, 7).inputs["input_ids"]
    changed = out != ids
    assert not changed[~mask].any() and not changed[:, 0].any()
    assert (out[:, 0] == 101).all() and not torch.isin(out[mask & changed], torch.tensor([0, 101, 102])).any()
    share = changed[mask].float().mean().item()
    assert 0.18 < share < 0.3
    assert torch.equal(out, replace_tokens(b, Tok(), 0.25, 7).inputs["input_ids"])  # seeded


def test_python_api_compress_with_recovery(token_inputs):
    teacher = tiny_token_model().eval()
    data = read_tensors(token_inputs)
    cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=0.4, probe_passes=0)
    plain, _ = lrcompress.compress(teacher, cfg, data)
    small, report = lrcompress.compress(teacher, cfg, data, recovery=lrcompress.RecoveryConfig(
        steps=30, lr=3e-3, batch_size=8, eval_every=10, patience=0))
    rec = report.recovery
    assert rec["after_fold"]["loss"] < rec["before"]["loss"]
    assert report.params_after == sum(p.numel() for p in plain.parameters())
    assert "recovery" in json.loads(report.to_json())
    x = next(data.batches(16))
    with torch.no_grad():  # the original is untouched
        torch.testing.assert_close(x.run(teacher), x.run(tiny_token_model().eval()))
    assert all(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_early_stop_on_plateau_keeps_best(token_inputs):
    student, teacher, data = _toy(token_inputs)
    rc = RecoveryConfig(steps=50, lr=1e-12, batch_size=8, eval_every=2, patience=2, warmup=0)
    rep = recover(student, teacher, data, rc)
    assert rep.steps == 4 and rep.stopped.startswith("early stop")
    assert rep.best_step == 0 and rep.after_fold["loss"] == pytest.approx(rep.before["loss"], rel=1e-5)


def test_recovery_config_round_trips_through_json():
    rc = RecoveryConfig(steps=50, lr=1e-3, train="both", loss=("hidden", "kl"), rank_schedule=((10, 12), (20, 16)),
                        augment=0.1, warmup=3)
    back = RecoveryConfig.from_dict(json.loads(json.dumps(rc.to_dict())))
    assert back == rc
    with pytest.raises(lrcompress.LrcompressError, match="unknown recovery keys"):
        RecoveryConfig.from_dict({"stepz": 3})


def test_sample_texts_keep_the_held_out_sentences_out_of_training() -> None:
    import importlib.util

    from lrcompress.io.data import read_lines
    spec = importlib.util.spec_from_file_location("pydoc_text", ROOT / "samples" / "pydoc_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calib, held = mod.reference_split()
    assert read_lines(ROOT / "samples" / "calib.txt") == calib
    assert read_lines(ROOT / "samples" / "eval.txt") == held and len(held) == 500
    train = read_lines(ROOT / "samples" / "train.txt")
    large = mod.large_training_text()
    assert len(large) > 10 * len(train)
    assert not set(held) & set(train) and not set(held) & set(large)
    assert set(train) <= set(large)
