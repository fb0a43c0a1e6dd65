#!/bin/bash
# One GPU machine, one call: cores 0-1 and the GPU record real serving steps and time them again alone
# (experiments/probes/retime_steps.py); with SEARCH=1, the four searches of the README's 8-GPU table run
# meanwhile on cores 2-15 (resumable: results/best8_*/results.jsonl). Everything ends up in $OUT/b.tgz.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p $OUT/b
for arg in $([ -n "$SEARCH" ] && echo azure,loose azure,tight arxiv,loose arxiv,tight); do
  ( time JAX_PLATFORMS=cpu taskset -c 2-15 timeout ${SEARCH_S:-520} python3 -m experiments.search \
      --config=configs/search_best8.py:$arg --config.workers=4 ) > $OUT/b/search_${arg/,/_}.log 2>&1 &
done
( time taskset -c 0-1 timeout 250 python3 experiments/probes/step_trace.py configs/validate_gpu.py $OUT/b/trace.json \
    chunked:15 prefill_first:15 ) > $OUT/b/trace.log 2>&1
tail -3 $OUT/b/trace.log; echo "t=$SECONDS"
( time taskset -c 0-1 timeout $((530 - SECONDS)) python3 experiments/probes/retime_steps.py configs/validate_gpu.py \
    $OUT/b/trace.json $OUT/b/retime.json docs/benchmarks/profile_h100_1b_2026-12-07.json 250 ) > $OUT/b/retime.log 2>&1
tail -4 $OUT/b/retime.log; echo "t=$SECONDS"
wait
for d in results/best8_*; do mkdir -p $OUT/b/$(basename $d); cp $d/results.jsonl $d/top.md $OUT/b/$(basename $d)/ 2>/dev/null; done
tail -n 3 $OUT/b/search_*.log
cd $OUT && tar czf b.tgz b && rm -rf b
