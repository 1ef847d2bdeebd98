"""Toy models for tests: importable factories (``tests.models:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Linear layers with bias on a (B, 32) input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyTokenModel(nn.Module):
    """Embedding + Linear over token ids, keyword inputs like a Hugging Face model."""

    def __init__(self, vocab: int = 200, dim: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, 40)
        self.out = nn.Linear(40, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.out(torch.relu(self.proj(self.embed(input_ids))))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return h


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP()


def tiny_token_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyTokenModel()


def not_a_module() -> object:
    return {"a": 1}


class TwoBranch(nn.Module):
    """Two identical-shape branches; the second reaches the output scaled by 0.01, so it is
    far less sensitive. A sensitivity-aware allocator must give it the smaller rank."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(32, 32, bias=False)
        self.quiet = nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + 0.01 * self.quiet(x)


def two_branch() -> nn.Module:
    torch.manual_seed(0)
    return TwoBranch()


class PointwiseNet(nn.Module):
    """A 3x3 conv, then 1x1 convs with stride/padding/bias, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.pw1 = nn.Conv2d(24, 48, 1, stride=2, padding=1)
        self.pw2 = nn.Conv2d(48, 32, 1, bias=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pw2(torch.relu(self.pw1(torch.relu(self.stem(x))))))
        return self.head(h.mean(dim=(2, 3)))


def pointwise_net() -> nn.Module:
    torch.manual_seed(0)
    return PointwiseNet()


class ConvZoo(nn.Module):
    """Convs exercising every hyper-parameter: tuple stride/padding/dilation, no bias,
    a reflect-padded conv, a grouped conv (must stay dense) and a TT-friendly Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(1, 1))
        self.b = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, bias=False)
        self.c = nn.Conv2d(24, 24, 3, padding=1, padding_mode="reflect")
        self.g = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.fc = nn.Linear(24, 64)
        self.out = nn.Linear(64, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        h = torch.relu(self.c(h))
        h = torch.relu(self.g(h))
        return self.out(torch.relu(self.fc(h.mean(dim=(2, 3)))))


def conv_zoo() -> nn.Module:
    torch.manual_seed(0)
    return ConvZoo()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """Four residual blocks with same-role layers: the shared-basis test bed."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def stack() -> nn.Module:
    torch.manual_seed(0)
    return Stack()


class SlowMLP(TinyMLP):
    """TinyMLP that sleeps in every forward, so a run is long enough to be interrupted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time
        time.sleep(0.05)
        return super().forward(x)


def slow_mlp() -> nn.Module:
    torch.manual_seed(0)
    return SlowMLP()
