#!/usr/bin/env bash
# Idempotent set-up for every make target: Debian packages FFCV needs, the venv, the package.
# Each step checks before it acts, so a second run with nothing changed takes a few seconds.
#   VENV=path   where the virtual environment lives (default .venv)
#   EXTRA_APT   more Debian packages to make sure of (make test adds slurm and chromium)
#   SKIP_APT=1  check no Debian packages: their equivalents come from elsewhere (conda-forge)
# Missing packages are installed as root; any other user gets one line naming them, exit 2: a
# cluster login node has no sudo for its users, and a password prompt inside make helps no one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
FFCV_APT="pkg-config libturbojpeg0-dev libopencv-dev"
APT_PACKAGES="$FFCV_APT ${EXTRA_APT:-}"

missing=""
if [ "${SKIP_APT:-}" != 1 ]; then
    for pkg in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
fi
if [ -n "$missing" ] && [ "$(id -u)" -ne 0 ]; then
    echo "setup: error: missing Debian packages:$missing; only root can install them: ask an admin for" \
        "\`apt-get install --no-install-recommends$missing\`, or install their conda-forge equivalents" \
        "(README.md, \"On a cluster without root\") and run again with SKIP_APT=1" >&2
    exit 2
fi
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

# The venv is keyed by the dependency files: a changed pyproject or constraints file reinstalls.
deps_hash=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
stamp="$VENV/.rkan-dist-deps-$deps_hash"
if [ ! -f "$stamp" ]; then
    echo "setup: creating/updating venv $VENV (dependencies $deps_hash)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
    rm -f "$VENV"/.rkan-dist-deps-*
    touch "$stamp"
fi

# A cached venv may have been made from another clone: point the editable install here. The
# lookup runs with -P because `python -c` otherwise puts the working directory first on sys.path:
# it would find this clone's package whatever the venv points at, and processes started elsewhere
# (torchrun scripts, Slurm jobs) would import the other clone's code.
here="$(pwd -P)/rkan_dist/__init__.py"
installed=$("$VENV/bin/python" -P -c 'import importlib.util as u; s = u.find_spec("rkan_dist"); print(s.origin if s else "")' 2>/dev/null || true)
if [ "$installed" != "$here" ]; then
    echo "setup: pointing the editable install at $(pwd -P)"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
fi
