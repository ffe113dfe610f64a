#!/usr/bin/env bash
# Prepare, on this machine, what a GPU session carries (both folders are gitignored):
#   .devdata/he_train/*.webp      he/train re-coded losslessly (the pixels are identical)
#   .devdata/vgg16_relu2_2.pth    the VGG16 layers the feature loss uses (~1 MB of the 57 MB trunk)
#   .whl/                         compressai and pytorch-msssim wheels for the device's Python 3.12
# The device gets only the repository (64 MiB with what is carried), not ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared}
mkdir -p .devdata/he_train .whl
"$PY" - "$SHARED" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

shared = Path(sys.argv[1])
for p in sorted((shared / "data/he/train").glob("*.png")):
    out = Path(".devdata/he_train") / (p.stem + ".webp")
    if not out.exists():
        im = Image.open(p).convert("RGB")
        im.save(out, "WEBP", lossless=True, method=6)
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(im)), out
vgg = torch.load(shared / "weights/vgg16_features_imagenet.pth", weights_only=True)
torch.save({k: v for k, v in vgg.items() if int(k.split(".")[0]) < 9}, ".devdata/vgg16_relu2_2.pth")
PYEOF
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl compressai==1.2.8 pytorch-msssim==1.0.0
du -sh .devdata .whl
