#!/usr/bin/env bash
# The first use of a lent GPU: continue training the shipped weights, export them.
#
#   here, once:      bash train/pack_device.sh
#   device tool:     command "bash train/gpu_session.sh 8", carry [".devdata", ".whl"], timeout_s 600
#   back here:       cat /work/.device/.../wsicodec-hyperprior.pt.part-* > /tmp/new.pt   # sha256sum -c
#                    .venv/bin/python train/eval_bytes.py /tmp/new.pt --qualities 1 2 3 4 5 6 7 8 --lpips   # ship if better
#
# Writes to $OUT: wsicodec-hyperprior.pt in 15 MB parts (exported, ~17.7 MB) with its .sha256, log.csv,
# session.log and gpu_decode.json.  The
# training state with optimiser (~43 MB) is over the tool's 16 MiB a file, so the next
# session resumes from the exported weights (train.py accepts them; Adam restarts).
# ALPHA (default 50) weights the VGG feature loss; RESUME picks other starting weights; TRAIN_ARGS
# go to train.py as they are (e.g. TRAIN_ARGS="--grow-M 192": wider latents).  Unset, TRAIN_ARGS is
# the augmentation the shipped weights were trained with (runs 27-33, train/README.md: scales 1x / 2x /
# 4x at .7 / .2 / .1, stain jitter, scanner JPEG / JPEG 2000 re-codes); TRAIN_ARGS="" trains on plain
# crops, as run 18 did.
set -uo pipefail
MIN=${1:-8}
OUT=${OUT:-/tmp/wsicodec-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
TRAIN_ARGS=${TRAIN_ARGS-"--augment scale=1:.7/2:.2/4:.1"}
# --augment (train/augment.py) re-codes crops with Pillow's JPEG and JPEG 2000 (this machine has no
# imagecodecs): say at once when its Pillow lacks either instead of failing mid-run
case " ${TRAIN_ARGS} " in
    *" --augment "*)
        "$PY" -c "import sys; from PIL import features; sys.exit(not (features.check('jpg') and features.check('jpg_2000')))" 2>/dev/null \
            || { echo "TRAIN_ARGS asks for --augment, which needs Pillow with JPEG and JPEG 2000, and this machine's has not both"; exit 1; } ;;
esac
"$PY" train/train.py --data .devdata/he_train --out "$OUT/run" --resume "${RESUME:-wsicodec/weights/wsicodec-hyperprior.pt}" \
    --device "${DEVICE:-cuda}" --minutes "$MIN" --batch "${BATCH:-16}" --crop "${CROP:-256}" \
    --lr "${LR:-1e-4}" --lr-final "${LR_FINAL:-1e-5}" --alpha "${ALPHA:-50}" \
    --vgg .devdata/vgg16_relu2_2.pth --ckpt-every 60 --log-every 100 ${TRAIN_ARGS} || echo "training stopped with an error; exporting the last checkpoint"
"$PY" train/export.py "$OUT/run/last.pt" --out "$OUT/wsicodec-hyperprior.pt" --note "GPU session, ${MIN} min"
cp "$OUT/run/log.csv" "$OUT/log.csv"
rm -rf "$OUT/run"
# the tool returns files of at most 16 MiB: the weights (~17.7 MB with residual blocks) come in parts;
# here: cat wsicodec-hyperprior.pt.part-* > new.pt and check it against the .sha256
sha256sum "$OUT/wsicodec-hyperprior.pt" | tee "$OUT/wsicodec-hyperprior.pt.sha256"
split -b 15000000 "$OUT/wsicodec-hyperprior.pt" "$OUT/wsicodec-hyperprior.pt.part-" && rm "$OUT/wsicodec-hyperprior.pt"
# then the decode check of bench/README.md (~30 s; the shipped weights, on training images: the
# carry has no room for he/test as well): CPU-made tiles decoded on the GPU, GPU MP/s
if [ -z "${SKIP_DECODE_CHECK:-}" ]; then
    "$PY" bench/gpu_decode.py --images .devdata/he_train --tiles "${DECODE_TILES:-64}" --device "${DEVICE:-cuda}" \
        --out "$OUT/gpu_decode.json" 2>&1 | grep -v -i warn || echo "the decode check failed"
fi
ls -la "$OUT"
