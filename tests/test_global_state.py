"""No hidden global state: thread counts, matplotlib's backend, the process group and sys.path
are the same after a call as before it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_torch_threads_is_restored_even_on_error() -> None:
    from lrcompress.scoped import torch_threads
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_dist_info_is_a_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for rank and world size never initialises a process group."""
    import torch.distributed as dist

    from lrcompress.io.distributed import dist_info
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist_info() == (1, 2)
    assert not dist.is_initialized()


def test_plots_leave_matplotlib_global_state_alone(tmp_path) -> None:
    """Every plot is drawn with matplotlib's object API: pyplot is never imported, no backend
    is chosen for the process (checked in a fresh interpreter)."""
    code = f"""
import sys
import matplotlib
backend = matplotlib.rcParams._get_backend_or_none()
from lrcompress.workflow.sweep import pareto_plot
pts = [dict(bytes=2e6, drift=0.1, p50_ms=3.0, method='svd', quantize='none', label='a', pareto=True),
       dict(bytes=4e6, drift=0.0, p50_ms=5.0, method='original', quantize='none', label='o', pareto=True)]
pareto_plot(pts, {str(tmp_path / 'p.png')!r}, title='t')
assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'
assert matplotlib.rcParams._get_backend_or_none() == backend, 'backend changed'
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "p.png").stat().st_size > 1000
