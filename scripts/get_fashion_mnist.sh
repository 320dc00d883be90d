#!/usr/bin/env bash
# Installs Fashion-MNIST from Debian's dataset-fashion-mnist package when it is missing.
set -u
dir=/usr/share/datasets/fashion-mnist
if ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "Fashion-MNIST not found under $dir: installing the Debian package dataset-fashion-mnist"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "could not install dataset-fashion-mnist; the demo will fall back to scikit-learn digits"
else
  echo "Fashion-MNIST not found under $dir and apt-get is not usable here (need root):"
  echo "  sudo apt-get install dataset-fashion-mnist   # or pass --data-dir; the demo falls back to digits"
fi
exit 0
