#!/bin/bash
# One H200: the step-cost profiles of the shipped model shapes and the decode-step baseline, one part per call
# (each takes 2-6 minutes, and a device call at most 10):
#   bash experiments/probes/h200_profiles.sh llama-3.2-1b    (then llama-3.1-8b, then decode)
#   bash experiments/probes/h200_profiles.sh validate        (the shipped 1B file against real serving, then a
#                                                              fresh 1B profile to simulate the same runs with)
# On any other card it stops at once (exit 3), since those files are for the H200.
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
case "$name" in *H200*) ;; *) exit 3 ;; esac
part=${1:?which part: llama-3.2-1b, llama-3.1-8b or decode}
if [ "$part" = validate ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  export TF_CPP_MIN_LOG_LEVEL=2
  ( time timeout 400 python3 -m experiments.validate_sim --config=configs/validate_gpu.py \
      --config.cost_model=pdopt/step_costs/llama-3.2-1b_h200.json --out=$OUT/validate_h200.json ) \
      > $OUT/validate.log 2>&1
  tail -14 $OUT/validate.log; echo "t=$SECONDS"
  MODELS=llama-3.2-1b timeout $((570 - SECONDS)) bash experiments/probes/profile_gpu.sh
elif [ "$part" = decode ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  python3 -m experiments.bench_engine --parts=decode --out=$OUT/engine_decode_h200.json > $OUT/bench_decode.log 2>&1
  tail -30 $OUT/bench_decode.log
else
  MODELS=$part bash experiments/probes/profile_gpu.sh
fi
