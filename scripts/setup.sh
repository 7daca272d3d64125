#!/usr/bin/env bash
# Idempotent set-up for every make target: Debian packages FFCV needs, the venv, the package.
# Each step checks before it acts, so a second run with nothing changed takes a few seconds.
#   VENV=path   where the virtual environment lives (default .venv)
#   EXTRA_APT   more Debian packages to make sure of (make test adds slurm and chromium)
#   SKIP_APT=1  check no Debian packages: their equivalents come from elsewhere (conda-forge)
#   TORCH_CUDA=cu126|cu130|cu132|cpu   install torch and torchvision (the versions constraints.txt
#               pins) in that CUDA build from PyTorch's own index instead of PyPI's build; the venv
#               remembers it, so later targets keep it (back to PyPI's build: remove the venv)
#   TORCH_INDEX_URL  where that build comes from (default https://download.pytorch.org/whl/$TORCH_CUDA)
# Missing packages are installed as root; any other user gets one line naming them, exit 2: a
# cluster login node has no sudo for its users, and a password prompt inside make helps no one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CUDA=${TORCH_CUDA:-$(cat "$VENV/.rkan-dist-torch-cuda" 2>/dev/null || true)}
case "$TORCH_CUDA" in
    "" | cpu | cu[0-9][0-9][0-9]) ;;
    *) echo "setup: error: TORCH_CUDA=$TORCH_CUDA names no torch build: cu<CUDA version without its dot> or cpu" \
            "(torch 2.14 has cu126, cu130, cu132; README.md, \"GPU drivers and torch builds\")" >&2
       exit 2 ;;
esac
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$TORCH_CUDA}
torch_version=$(sed -n 's/^torch==//p' constraints.txt)
vision_version=$(sed -n 's/^torchvision==//p' constraints.txt)
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

# Which torch build an NVIDIA driver can run. A torch built for CUDA 13.x needs driver R580 or
# newer, one built for 12.x R525 or newer (NVIDIA's minimum drivers for CUDA minor-version
# compatibility, CUDA toolkit release notes); torch 2.14's CUDA builds are 12.6, 13.0 and 13.2
# (PyTorch's release compatibility matrix). Older drivers leave torch.cuda.is_available() False,
# and `device: auto` stops with one line (rkan_dist/nvidia.py) instead of training on the CPU.
PYPI_TORCH_CUDA=13.0  # torch.version.cuda of the pinned torch from PyPI, as `make setup` installs it
minimum_driver() { case "$1" in 13.*) echo 580 ;; 12.*) echo 525 ;; *) echo "" ;; esac; }
build_for_driver() { if [ "$1" -ge 580 ]; then echo cu130; elif [ "$1" -ge 525 ]; then echo cu126; fi; }
driver=""
if command -v nvidia-smi >/dev/null 2>&1; then
    driver=$(timeout 10 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
        | head -n 1 | cut -d , -f 1 | tr -d ' ' || true)
fi
if [[ "$driver" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
    # The CUDA version of the torch this venv gets: the chosen build, else the one it has, else PyPI's.
    torch_file=$(ls "$VENV"/lib/python3*/site-packages/torch/version.py 2>/dev/null | head -n 1 || true)
    if [ "$TORCH_CUDA" = cpu ]; then
        build_cuda=""
    elif [ -n "$TORCH_CUDA" ]; then
        digits=${TORCH_CUDA#cu}
        build_cuda="${digits:0:2}.${digits:2}"
    elif [ -n "$torch_file" ]; then
        build_cuda=$(sed -n "s/^cuda[^=]*= *'\([0-9.]*\)'.*/\1/p" "$torch_file" | head -n 1)  # none: CPU-only
    else
        build_cuda=$PYPI_TORCH_CUDA
    fi
    needed=$(minimum_driver "$build_cuda")
    series=${driver%%.*}
    if [ -z "$needed" ] || [ "$series" -lt "$needed" ]; then
        if [ -n "$build_cuda" ]; then
            what="built for CUDA $build_cuda, which needs driver R$needed or newer"
        else
            what="a CPU-only build"
        fi
        echo "setup: NVIDIA driver $driver here, but the torch $torch_version this venv gets is $what: it" \
            "cannot use these GPUs (\`device: auto\` stops; train.device=cpu trains on the CPU)" >&2
        fits=$(build_for_driver "$series")
        if [ -n "$fits" ]; then
            echo "setup: the build for driver R$series: \`TORCH_CUDA=$fits make setup\` installs" \
                "torch==$torch_version+$fits and torchvision==$vision_version+$fits from" \
                "https://download.pytorch.org/whl/$fits" >&2
        else
            echo "setup: no CUDA build of torch $torch_version runs on driver R$series: ask for R580 or newer" \
                "(PyPI's build), or R525 or newer with TORCH_CUDA=cu126" >&2
        fi
    fi
fi

# The venv is keyed by the dependency files (and the torch build, where one is chosen): a changed
# pyproject or constraints file reinstalls.
deps_hash=$({ cat pyproject.toml constraints.txt; [ -z "$TORCH_CUDA" ] || echo "torch build $TORCH_CUDA"; } \
    | sha256sum | cut -c1-16)
stamp="$VENV/.rkan-dist-deps-$deps_hash"
if [ ! -f "$stamp" ]; then
    echo "setup: creating/updating venv $VENV (dependencies $deps_hash)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel
    constraints=constraints.txt
    if [ -n "$TORCH_CUDA" ]; then
        # constraints.txt pins the CUDA libraries (nvidia-*, cuda-*) of PyPI's build; another build
        # brings its own, so they are left out; torch and torchvision keep their pinned versions.
        constraints="$VENV/.rkan-dist-constraints-$TORCH_CUDA.txt"
        grep -vE '^(nvidia|cuda)-' constraints.txt > "$constraints"
        echo "setup: torch $torch_version and torchvision $vision_version in build $TORCH_CUDA from $TORCH_INDEX_URL"
        "$VENV/bin/python" -m pip install -q -c "$constraints" --index-url "$TORCH_INDEX_URL" \
            "torch==$torch_version+$TORCH_CUDA" "torchvision==$vision_version+$TORCH_CUDA"
    fi
    "$VENV/bin/python" -m pip install -q -c "$constraints" -e ".[dev]"
    rm -f "$VENV"/.rkan-dist-deps-*
    if [ -n "$TORCH_CUDA" ]; then echo "$TORCH_CUDA" > "$VENV/.rkan-dist-torch-cuda"; fi
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
