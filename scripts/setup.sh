#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the Fashion-MNIST files (Debian package) and the project
# with its Python dependencies. Safe to run before every command.
# --with-browser: also Debian's chromium, which only the tests use (headless rendering of report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
with_browser=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) with_browser=1 ;;
    *) echo "usage: bash scripts/setup.sh [--with-browser]" >&2; exit 2 ;;
  esac
done
if [ "$with_browser" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "note: /usr/bin/chromium missing: 'sudo apt-get install chromium' (the report.html browser test skips without it)" >&2
  fi
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST files missing: 'sudo apt-get install dataset-fashion-mnist', or pass --set data.data_root=DIR" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e ".[dev]"
