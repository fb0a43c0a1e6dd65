#!/bin/bash
# One GPU, one call: a fresh step-cost profile of the Llama-3.2-1B shape (at the validation config's buckets),
# then every step of real serving runs of the validation workload recorded (`step_trace.py`) and priced with
# that profile by the kind of step and of the step before it (`step_errors.py`). Results in $OUT.
#   bash experiments/probes/trace_steps.sh [RUNS]   (default: prefill_first:15 slo_aware:15 chunked:15 prefill_first:60)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD TF_CPP_MIN_LOG_LEVEL=2 || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
MODELS=llama-3.2-1b bash experiments/probes/profile_gpu.sh; echo "t=$SECONDS"
[ -s $OUT/llama-3.2-1b_gpu.json ] || exit 1
runs=${*:-prefill_first:15 slo_aware:15 chunked:15 prefill_first:60}
left=$((560 - SECONDS))
( time timeout $left python3 experiments/probes/step_trace.py configs/validate_gpu.py $OUT/trace.json $runs ) \
  > $OUT/trace.log 2>&1
tail -6 $OUT/trace.log; echo "t=$SECONDS"
[ -s $OUT/trace.json ] && python3 experiments/probes/step_errors.py $OUT/trace.json $OUT/llama-3.2-1b_gpu.json
