"""A small CNN on scikit-learn's bundled 8x8 digits (no download): a real conv checkpoint to compress.

Use from Python (``build``, ``load_data``, ``train``, ``accuracy``) or as a script::

    python samples/digits_cnn.py --out DIR
    lrcompress inspect samples/digits_cnn.py:build --weights DIR/digits_cnn.safetensors --calib DIR/calib.npy

The script writes ``DIR/digits_cnn.safetensors`` (state dict), ``DIR/calib.npy`` (256 training
images, float32, (256, 1, 8, 8)), ``DIR/test.npz`` (``x``, ``y``: the held-out split) and
``DIR/test_x.npy`` (its images alone). ``samples/digits/`` holds this output (seed 0) for the recipe.
Inputs are (N, 1, 8, 8) float32 in [0, 1] (pixel / 16); outputs are 10 logits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 0
TEST_SIZE = 500
CALIB_SIZE = 256


class DigitsCNN(nn.Module):
    """conv 1->32 (3x3, pad 1) -> conv 32->64 (3x3, stride 2, pad 1) -> conv 64->64 (3x3, pad 1)
    -> flatten (1024) -> Linear 1024->128 -> Linear 128->10. Every layer has a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.act = nn.ReLU()
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.head(self.act(self.fc(h)))


def build(seed: int = SEED) -> nn.Module:
    """The architecture with a deterministic init (the global RNG state is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN()


def load_data(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a fixed stratified 1297/500 split of sklearn's digits.

    x: float32 (N, 1, 8, 8) in [0, 1]; y: int64 (N,).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, stratify=y, random_state=seed)
    return (torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(y_tr),
            torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(y_te))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def train(epochs: int = 15, seed: int = SEED, lr: float = 2e-3, batch_size: int = 64,
          data: tuple[torch.Tensor, ...] | None = None, threads: int | None = 1) -> nn.Module:
    """Train ``build(seed)`` with Adam on the training split (deterministic for a given seed).

    ``data`` reuses a ``load_data()`` result. ``threads`` (default 1, restored afterwards; None
    keeps torch's setting): this model is so small that intra-op threads only add overhead, and
    on a shared 2-core CPU they made training several times slower. Returns the model in eval mode.
    """
    x_tr, y_tr, _, _ = data if data is not None else load_data(seed)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(x_tr, y_tr, epochs, seed, lr, batch_size)
    finally:
        torch.set_num_threads(before)


def _fit(x_tr: torch.Tensor, y_tr: torch.Tensor, epochs: int, seed: int, lr: float,
         batch_size: int) -> nn.Module:
    model = build(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def save_artifacts(model: nn.Module, data: tuple[torch.Tensor, ...], out: str | Path) -> dict[str, Path]:
    """Write the checkpoint, 256 calibration images and the held-out split under ``out``."""
    from safetensors.torch import save_file

    x_tr, _, x_te, y_te = data
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"weights": out / "digits_cnn.safetensors", "calib": out / "calib.npy", "test": out / "test.npz",
             "test_x": out / "test_x.npy"}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(paths["weights"]))
    np.save(paths["calib"], x_tr[:CALIB_SIZE].numpy().astype(np.float32))
    np.savez(paths["test"], x=x_te.numpy().astype(np.float32), y=y_te.numpy())
    np.save(paths["test_x"], x_te.numpy().astype(np.float32))  # inputs only: validate's --data
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the checkpoint and data files")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    data = load_data(args.seed)
    t0 = time.perf_counter()
    model = train(epochs=args.epochs, seed=args.seed, data=data)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, data[2], data[3])
    paths = save_artifacts(model, data, args.out)
    print(f"held-out accuracy {acc:.4f} on {len(data[3])} images; training {seconds:.1f} s "
          f"({args.epochs} epochs, 1 thread)")
    print(f"wrote {paths['weights']}, {paths['calib']}, {paths['test']}")


if __name__ == "__main__":
    main()
