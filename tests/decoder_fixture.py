"""The trained tiny decoder (samples/train_decoder.py, preset ``tiny``) as a session fixture.

Use it from a test module with ``from tests.decoder_fixture import tiny_decoder  # noqa: F401`` or
from conftest.py the same way. The folder is built once per session (about 10 s on two cores;
a second definition of the fixture, e.g. in conftest.py and a test module, reuses the same
folder). It is a Hugging Face folder (GPT2LMHeadModel, tied embedding and LM head, byte-level
BPE tokenizer) with ``train.txt``, ``calib.txt`` and ``heldout.txt`` beside the weights and the
figures of the build in ``decoder_build.json``. Treat it as read-only: copy it to change it.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "train_decoder.py"
_BUILT: dict[str, Path] = {}


@lru_cache(maxsize=1)
def train_decoder_module() -> ModuleType:
    """samples/train_decoder.py loaded by path as module ``train_decoder_sample``, once per session
    (sys.path untouched)."""
    name = "train_decoder_sample"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SAMPLE)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[name] = mod  # registered before it runs: dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the trained ``tiny`` decoder (2 layers, width 64, context 64, vocabulary 2048)."""
    if "tiny" not in _BUILT:
        out = tmp_path_factory.mktemp("decoder") / "tiny"
        _BUILT["tiny"] = train_decoder_module().build_decoder("tiny", out, quiet=True)
    return _BUILT["tiny"]
