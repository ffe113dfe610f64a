#!/usr/bin/env bash
# Rerun every learned-codec benchmark after the shipped weights change (idle 2-core machine: 12 minutes on
# 2026-11-27 before the refine step, which adds 7; SKIP=refine leaves it out).
# The classical codecs' results stay; each script writes its JSON (and PNG) under bench/results/.
#
#   bash bench/rerun_learned.sh            # all
#   SKIP="serve slides" bash bench/rerun_learned.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SKIP=${SKIP:-}
step() { case " $SKIP " in *" $1 "*) echo "== skip $1";; *) echo "== $1 ($(date +%T))"; shift; "$@";; esac; }
step rd       "$PY" bench/rd.py --update learned
step refine   "$PY" bench/rd.py --codecs learned,learned_refine,jpegxl --max-images 3 --crop 512 \
                  --tag refine_he_test --no-visual
step seams    "$PY" bench/seams.py --max-images 3 --qualities 1 4 8
step speed    "$PY" bench/tile_speed.py
step context  "$PY" bench/context_cost.py
step entropy  "$PY" bench/entropy_speed.py
step vsjxl    "$PY" bench/vs_jpegxl.py
step slides   "$PY" bench/slides.py --codecs learned --out bench/results/slides_learned.json
container=${TMPDIR:-/tmp}/wsicodec-serve-bench.zarr.zip
step serve    bash -c "'$PY' -m wsicodec compress ../shared/data/slides/cmu_small_region.svs '$container' --overwrite --quiet \
                       && '$PY' bench/serve.py '$container' --torch-threads 1 --out bench/results/serve.json --note \"${NOTE:-}\" \
                       && '$PY' bench/serve.py '$container' --out bench/results/serve_threads2.json --note \"${NOTE:-}\" \
                       && '$PY' bench/serve.py '$container' --precision bfloat16 --skip load \
                              --out bench/results/serve_threads2_bf16.json --note \"${NOTE:-}\""
echo "== done ($(date +%T))"
