#!/usr/bin/env bash
# One run on a lent GPU host (JAX with CUDA preinstalled, no internet): the memory read at 2^20 tokens at
# default vs HIGHEST precision, train-step tokens/s, and the passkey sweep of experiments/passkey_sweep.py.
# Missing pure-Python deps are installed from wheels carried in build/wheels (pip download on a networked host).
#   bash benchmarks/device_check.sh OUT_DIR
set -u
OUT=${1:-${OUT:-/tmp/device_out}}; mkdir -p "$OUT"
export PYTHONPATH=$PWD TPU_SKIP_MDS_QUERY=1
python -c "import grain, ml_collections, tensorboardX, sentencepiece" 2>/dev/null || \
  python -m pip install -q --no-index --find-links build/wheels --no-deps grain array-record ml-collections tensorboardX \
    sentencepiece cloudpickle portpicker 2>&1 | grep -v WARNING | tail -3
nvidia-smi -L; python -c "import jax; print(jax.__version__, jax.devices())"
timeout 100 python benchmarks/train_throughput.py 2>&1 | tail -8 | tee "$OUT/throughput.md"
(JAX_DEFAULT_MATMUL_PRECISION=highest timeout 370 python experiments/passkey_sweep.py --variants all --workers 8 \
   --steps 600 --out /tmp/sweep600 > "$OUT/sweep600.log" 2>&1 &
 JAX_DEFAULT_MATMUL_PRECISION=highest timeout 370 python experiments/passkey_sweep.py \
   --variants base,delta,loss_all,no_intro256,seg32,d64_seg32 --workers 6 --steps 1500 --out /tmp/sweep1500 \
   > "$OUT/sweep1500.log" 2>&1 & wait) &
[ -n "${SKIP_PRECISION:-}" ] || timeout 150 python benchmarks/memory_precision.py --tokens 1048576 2>&1 | tee "$OUT/precision.md"
wait
cat /tmp/sweep*/sweep.jsonl | tee "$OUT/sweep.jsonl"
grep -h '"error"' "$OUT"/sweep*.log | head -5
