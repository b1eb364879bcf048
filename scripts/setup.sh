#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the Fashion-MNIST files (Debian package) and the project
# with its Python dependencies. Safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST files missing: 'sudo apt-get install dataset-fashion-mnist', or pass --set data.data_root=DIR" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e ".[dev]"
