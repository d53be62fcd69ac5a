#!/usr/bin/env bash
# Run here (CPU), once, before bench/device.sh: the device image has torch, transformers, lightning, peft, pytest
# and pyyaml but not omegaconf; download it (and its one dependency) as Python 3.12 x86-64 wheels into .whl/,
# which git ignores and the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in omegaconf==2.3.0 antlr4-python3-runtime==4.9.3; do
  python3 -m pip download -q --no-deps --python-version 3.12 --implementation py --implementation cp \
    --platform any --platform manylinux_2_17_x86_64 -d .whl "$pkg" \
  || python3 -m pip download -q --no-deps -d .whl "$pkg"  # antlr4's runtime ships as an sdist only
done
ls -la .whl
