#!/bin/bash
# One H200: the step-cost profiles of the shipped model shapes and the decode-step baseline, one part per call
# (each takes 2-6 minutes, and a device call at most 10):
#   bash experiments/probes/h200_profiles.sh llama-3.2-1b    (then llama-3.1-8b, then decode)
#   bash experiments/probes/h200_profiles.sh validate        (a fresh 1B profile, then the simulator with it
#                                                              against real serving: configs/validate_gpu.py)
# On any other card it stops at once (exit 3), since those files are for the H200.
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
case "$name" in *H200*) ;; *) exit 3 ;; esac
part=${1:?which part: llama-3.2-1b, llama-3.1-8b, decode or validate}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD TF_CPP_MIN_LOG_LEVEL=2 || exit 1
if [ "$part" = validate ]; then
  # The profile first, so that the validation's simulation uses one made minutes before on the same machine (the
  # real runs' metrics are in the output: any other file is validated against them by simulating on a CPU).
  MODELS=llama-3.2-1b bash experiments/probes/profile_gpu.sh; echo "t=$SECONDS"
  [ -s $OUT/llama-3.2-1b_gpu.json ] || exit 1
  left=$((580 - SECONDS))
  [ $left -ge 120 ] || { echo "no time left for the validation ($left s)"; exit 1; }
  ( time timeout $left python3 -m experiments.validate_sim --config=configs/validate_gpu.py \
      --config.cost_model=$OUT/llama-3.2-1b_gpu.json --out=$OUT/validate_h200.json ) > $OUT/validate.log 2>&1
  tail -14 $OUT/validate.log; echo "t=$SECONDS"
elif [ "$part" = decode ]; then
  python3 -m experiments.bench_engine --parts=decode --out=$OUT/engine_decode_h200.json > $OUT/bench_decode.log 2>&1
  tail -30 $OUT/bench_decode.log
else
  MODELS=$part bash experiments/probes/profile_gpu.sh
fi
