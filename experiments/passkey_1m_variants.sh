#!/usr/bin/env bash
# Recipe search for the 1M-token passkey: several experiments/passkey_1m.py variants side by side on one lent
# GPU (each is latency-bound, so they share it), then one summary. What a variant finds is confirmed on the
# CPU with the plain experiments/passkey_1m.py command before the README quotes it.
#   bash experiments/passkey_1m_variants.sh OUT_DIR [BOOKS_DIR]
# Each line of VARIANTS below is "name|passkey_1m.py arguments" (the default: batch 1 of
# experiments/results/passkey_1m_gpu_variants, with the mass keys spelt out as e59721e's tiny config had them).
# Matmuls run at full float32 precision (JAX_DEFAULT_MATMUL_PRECISION=highest), as on a CPU.
set -u
OUT=${1:-${OUT:-/tmp/variants_out}}; BOOKS=${2:-../shared/corpus/pg19}; mkdir -p "$OUT"
export PYTHONPATH=$PWD TPU_SKIP_MDS_QUERY=1 JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import grain, ml_collections, tensorboardX" 2>/dev/null || \
  python -m pip install -q --no-index --find-links build/wheels --no-deps grain array-record ml-collections tensorboardX \
    cloudpickle portpicker 2>&1 | grep -v WARNING | tail -3
nvidia-smi -L 2>/dev/null; python -c "import jax; print(jax.__version__, jax.devices())"
# two passes, so that a variant cut off by its timeout still reports 64K and 256K
EVAL=${EVAL:-"--knockout none --trials 10"}; SHORT=${SHORT:-64K,256K}; LONG=${LONG:-1M}
VARIANTS=${VARIANTS:-"m4096|--config.data.passkey_mass_max=4096 --config.data.passkey_mass_after=2400
m65536|--config.data.passkey_mass_max=65536 --config.data.passkey_mass_after=2400
m65536_s6000|--config.data.passkey_mass_max=65536 --steps 6000 --config.data.passkey_mass_after=4800
m1M|--config.data.passkey_mass_max=1048576 --config.data.passkey_mass_after=2400
m65536_after1500|--config.data.passkey_mass_max=65536 --config.data.passkey_mass_after=1500
m65536_seed1|--config.data.passkey_mass_max=65536 --config.data.passkey_mass_after=2400 --config.train.seed=1 --config.data.seed=1
m65536_delta|--config.data.passkey_mass_max=65536 --config.data.passkey_mass_after=2400 --rules delta
m65536_books|--config.data.passkey_mass_max=65536 --config.data.passkey_mass_after=2400 --haystack $BOOKS"}
RUNS=/tmp/variants_runs; rm -rf $RUNS; mkdir -p $RUNS
while IFS='|' read -r name args; do
  # shellcheck disable=SC2086
  (t0=$(date +%s)
   python experiments/passkey_1m.py --out $RUNS/$name --rules linear $EVAL $args --lengths $SHORT
   echo "train + eval $SHORT: $(( $(date +%s) - t0 )) s"
   python experiments/passkey_1m.py --out $RUNS/$name --rules linear $EVAL $args --lengths $LONG --eval_only
  ) > $RUNS/$name.log 2>&1 &
  echo "$name|$args" >> $RUNS/variants.txt
done <<< "$VARIANTS"
# only this script's runs (their --out is under $RUNS), not another passkey_1m.py on the same host
for _ in $(seq "${VARIANT_TIMEOUT:-420}"); do pgrep -f "out $RUNS/" >/dev/null || break; sleep 1; done
pkill -f "out $RUNS/"; wait
for f in $RUNS/*.log; do
  n=$(basename "$f" .log); echo "## $(grep "^$n|" $RUNS/variants.txt)"; grep -hE -A8 "memory: passkey|^train \+ eval|Error|error" "$f" | grep -v "^--$" | head -40
done | tee "$OUT/summary.md"
tar czf "$OUT/runs.tgz" -C $RUNS --exclude=checkpoints --exclude=tb . 2>/dev/null
