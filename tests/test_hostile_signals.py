"""Hostile input, interrupts: SIGINT exits 130 and SIGTERM 143 with one line and no traceback,
the temporary sibling is removed; one left by SIGKILL is cleaned by the next run to that output.
Each test runs the real command in a subprocess and signals it mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, file_hashes

RECIPE = """source = "{source}"
[data]
calib = "calib.npy"
batch_size = 1
[compress]
method = "svd-whiten"
ratio = 0.5
"""


def _inputs(tmp: Path, source: str) -> Path:
    inp = tmp / "in"
    inp.mkdir(exist_ok=True)
    np.save(inp / "calib.npy", np.random.default_rng(0).standard_normal((400, 32)).astype(np.float32))
    (inp / "r.toml").write_text(RECIPE.format(source=source))
    return inp / "r.toml"


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "lrcompress", "run", str(recipe), "-o", str(out), "-q",
                             "--trust-code"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _wait_for_sibling(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _siblings(out):
            time.sleep(0.5)  # well inside the calibration loop
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no temporary sibling appeared")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_mid_run(tmp_path: Path, sig: int, code: int, word: str) -> None:
    recipe = _inputs(tmp_path, "tests.models:slow_mlp")
    before = file_hashes(tmp_path / "in")
    out = tmp_path / "out"
    proc = _start(recipe, out)
    _wait_for_sibling(proc, out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [f"lrcompress: {word}; unfinished outputs were removed"], stderr
    assert not out.exists() and _siblings(out) == []
    assert file_hashes(tmp_path / "in") == before


def test_sigkill_leftover_is_cleaned_by_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start(_inputs(tmp_path, "tests.models:slow_mlp"), out)
    _wait_for_sibling(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    left = _siblings(out)
    assert len(left) == 1 and ".tmp-" in left[0], left
    (tmp_path / "other").mkdir()  # a second recipe, same output, fast model
    recipe = _inputs(tmp_path / "other", "tests.models:tiny_mlp")
    done = subprocess.run([sys.executable, "-m", "lrcompress", "run", str(recipe), "-o", str(out), "-q",
                           "--trust-code"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _siblings(out) == [] and (out / "model" / "model.safetensors").is_file()


def test_live_sibling_of_another_run_is_kept(tmp_path: Path) -> None:
    """A sibling whose process is alive is never touched (two runs to one output)."""
    from lrcompress.paths import clean_stale
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-0123abcd"
    dead = tmp_path / ".out.tmp-999999999-0123abcd"
    other = tmp_path / ".outer.tmp-999999999-0123abcd"
    for d in (live, dead, other):
        d.mkdir()
    clean_stale(out)
    assert live.exists() and other.exists() and not dead.exists()


def test_killed_swap_puts_the_previous_output_back(tmp_path: Path) -> None:
    """Killed between parking the old folder and moving the new one in: the old one returns."""
    from lrcompress.paths import clean_stale
    out = tmp_path / "out"
    parked = tmp_path / ".out.old-999999999-0123abcd"
    (parked / "x").mkdir(parents=True)
    (parked / "x" / "model.safetensors").write_text("previous")
    clean_stale(out)
    assert (out / "model.safetensors").read_text() == "previous" and not parked.exists()


def test_sigint_during_recovery_keeps_the_resumable_state(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Interrupted recovery: exit 130, one line that says how to resume, the state file kept."""
    from tests.conftest import cli_run
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(64, 10)), 199).astype(np.int64)
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    ck = tmp_path / "ck"
    assert cli_run(["compress", "tests.models:tiny_token_model", "--calib", data, "--ratio", "0.4", "-o", ck, "-q"],
                   capsys)[0] == 0
    out, state = tmp_path / "out", tmp_path / "out.recover-state.pt"
    proc = subprocess.Popen([sys.executable, "-m", "lrcompress", "recover", str(ck), "--reference",
                             "tests.models:tiny_token_model", "--data", str(data), "--steps", "1000000",
                             "--eval-every", "5", "--patience", "0", "-o", str(out), "-q", "--trust-code"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not state.exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), proc.communicate(timeout=5) if proc.poll() is not None else "no state file"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrcompress: interrupted (SIGINT)") and "--resume" in lines[0], stderr
    assert state.is_file() and not out.exists() and _siblings(out) == []
