"""A new method is one file: a toy method defined here, registered in one line, runs through
the Python API, save/load, the CLI and a recipe without any change to the library."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import lrcompress as lc
from lrcompress.methods import registry
from lrcompress.methods.base import Choice, Factorized, Method
from lrcompress.methods.svd import SVDConfig
from tests.conftest import run_main

MLP = "tests.models:tiny_mlp"


class ToyLinear(nn.Module):
    """y = x right^T left^T + bias, two raw parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.zeros(out_features, rank))
        self.right = nn.Parameter(torch.zeros(rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.right.T @ self.left.T
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.left @ self.right


@dataclass(frozen=True)
class ToyConfig(SVDConfig):
    """Truncated SVD of Linear layers, balanced (sqrt of the singular values on each side)."""

    name: str = field(default="toy", init=False)


@dataclass(frozen=True)
class ToyChoice(Choice):
    rank: int

    def label(self) -> str:
        return f"toy{self.rank}"


class ToyMethod(Method):
    name = "toy"
    config = ToyConfig
    summary = "test-only balanced SVD"
    kinds = ("linear",)
    modules = (ToyLinear,)
    entry_kinds = ("toy_linear",)

    def takes(self, mod: nn.Module, config: Any) -> bool:
        return isinstance(mod, nn.Linear)

    def plan_layer(self, lp: Any, mod: nn.Module, config: Any, frac: float | None, gram: Any, preset: Any = False) -> None:
        m, n = mod.weight.shape
        rank = config.rank if config.rank is not None else max(1, math.floor(frac * m * n / (m + n)))
        lp.choice = ToyChoice(rank)
        lp.set_rank(rank, rank * (m + n), self.name)

    def factorize(self, model: nn.Module, lp: Any, plan: Any) -> Factorized:
        mod = model.get_submodule(lp.name)
        u, s, vh = torch.linalg.svd(mod.weight.detach().double(), full_matrices=False)
        r = lp.choice.rank
        root = s[:r].sqrt()
        new = ToyLinear(mod.in_features, mod.out_features, r, mod.bias is not None)
        with torch.no_grad():
            new.left.copy_((u[:, :r] * root).float())
            new.right.copy_((root[:, None] * vh[:r]).float())
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        return Factorized({lp.name: new})  # no error given: apply measures it

    def entry(self, mod: nn.Module, groups: dict[int, str]) -> dict[str, Any]:
        return {"kind": "toy_linear", "shape": list(mod.dense_weight().shape), "rank": mod.left.shape[1],
                "bias": mod.bias is not None}

    def shell(self, info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
        out_f, in_f = info["shape"]
        return ToyLinear(in_f, out_f, info["rank"], bool(info["bias"]))


@pytest.fixture
def toy() -> Iterator[ToyMethod]:
    method = registry.register(ToyMethod())  # the one line a new method needs
    yield method
    registry.unregister("toy")


def _optimum(w: torch.Tensor, r: int) -> float:
    s = np.linalg.svd(w.detach().double().numpy(), compute_uv=False)
    return float(np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))


def test_toy_method_through_python_api_save_and_load(toy: ToyMethod, tmp_path: Path) -> None:
    model = lc.resolve(MLP, trust_code=True).model
    small, rep = lc.compress(model, lc.CompressConfig(method=lc.method_config("toy"), rank=4))
    factorized = [l for l in rep.layers if l.method == "toy"]
    assert [l.name for l in factorized] == ["fc1", "fc2", "head"]
    for l in factorized:
        assert isinstance(small.get_submodule(l.name), ToyLinear)
        assert l.error_metric == "weight"  # no probe data: judged on the weight
        assert l.relative_error == pytest.approx(_optimum(model.get_submodule(l.name).weight, 4), rel=1e-5)
        assert l.params_after == 4 * sum(l.shape) and l.choice == ToyChoice(4)
    assert "toy4" in rep.table()
    assert rep.params_after == sum(p.numel() for p in small.parameters())
    lc.save(small, tmp_path / "ck", {"kind": "factory", "target": MLP})
    again, _ = lc.load(tmp_path / "ck", trust_code=True)
    x = torch.randn(5, 32)
    assert isinstance(again.get_submodule("fc2"), ToyLinear)
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


def test_toy_method_through_cli_and_recipe(toy: ToyMethod, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["methods"], capsys)
    assert code == 0 and any(line.split()[0] == "toy" for line in out.splitlines())
    code, out, err = run_main(["compress", MLP, "--method", "toy", "--ratio", "0.5", "-o", tmp_path / "cli"], capsys)
    assert code == 0, err
    model, _ = lc.load(tmp_path / "cli", trust_code=True)
    assert {n for n, m in model.named_modules() if isinstance(m, ToyLinear)} == {"fc1", "fc2", "head"}
    (tmp_path / "r.toml").write_text(f'source = "{MLP}"\n[compress]\nmethod = "toy"\nrank = 3\n')
    code, _, err = run_main(["run", tmp_path / "r.toml", "-o", tmp_path / "run", "-q"], capsys)
    assert code == 0, err
    model, _ = lc.load(tmp_path / "run" / "model", trust_code=True)
    assert model.get_submodule("fc1").left.shape == (64, 3)


def test_folder_of_an_unregistered_method_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    registry.register(ToyMethod())
    try:
        small, _ = lc.compress(lc.resolve(MLP, trust_code=True).model,
                               lc.CompressConfig(method=lc.method_config("toy"), rank=2))
        lc.save(small, tmp_path / "ck", {"kind": "factory", "target": MLP})
    finally:
        registry.unregister("toy")
    code, _, err = run_main(["export", tmp_path / "ck", "--to", "onnx", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "toy_linear" in err and "register" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    code, _, err = run_main(["compress", MLP, "--method", "toy", "--rank", "2", "-o", tmp_path / "y"], capsys)
    assert code == 2 and "'toy' is not one of" in err


def test_registry_lists_builtins_and_refuses_a_method_without_config() -> None:
    assert set(registry.names()) >= {"svd", "svd-whiten", "tucker", "cp", "tt", "shared-svd", "auto"}

    class NoConfig(Method):
        name = "bad"

    with pytest.raises(TypeError, match="config"):
        registry.register(NoConfig())
    assert "bad" not in registry.names()
