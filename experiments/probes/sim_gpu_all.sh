#!/bin/bash
# One GPU, one call: the step-cost profile of the Llama-3.2-1B shape on this card (at the validation config's
# buckets), the one-GPU deployment search with it (on the machine's CPUs), the search's best and median configs
# run for real, then (time permitting) the steps of real serving runs recorded. Results in $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TF_CPP_MIN_LOG_LEVEL=2
DEVICE=$(python3 -c "import jax; print(jax.devices()[0].device_kind)")
echo "$DEVICE"; mkdir -p $OUT/b
COST=$OUT/llama-3.2-1b_gpu.json
( time timeout 230 python3 -m experiments.profile_steps --model=llama-3.2-1b --out=$COST \
  --token_buckets=64,256,1024,2048 --seq_buckets=16,64,128 --page_buckets=64,256 ) > $OUT/b/profile_1b.log 2>&1
tail -4 $OUT/b/profile_1b.log; echo "t=$SECONDS"
( time JAX_PLATFORMS=cpu timeout 100 python3 -m experiments.search --config=configs/search_gpu1.py --config.workers=15 \
    "--config.device=$DEVICE" --config.cost_model=$COST ) > $OUT/b/search.log 2>&1
tail -12 $OUT/b/search.log; echo "t=$SECONDS"
cp results/search_gpu1/{top.md,results.jsonl,best_config.py,median_config.py} $OUT/b/
for which in best median; do
  ( time timeout 120 python3 -m experiments.run --config=results/search_gpu1/${which}_config.py --config.progress=False \
      --config.compilation_cache_dir=results/.jax_cache ) > $OUT/b/run_$which.log 2>&1
  grep -i "attainment\|TTFT\|TPOT\|error" $OUT/b/run_$which.log | head -12; echo "t=$SECONDS"
  if [ ! -f results/search_gpu1-$which/metrics.json ]; then  # The same engine in this process instead.
    tail -5 $OUT/b/run_$which.log
    policy=$(grep "c.deployments" results/search_gpu1/${which}_config.py | cut -d: -f3)
    ( time timeout 100 python3 -m experiments.run --config=results/search_gpu1/${which}_config.py --config.progress=False \
        --config.compilation_cache_dir=results/.jax_cache --config.deployments= --config.policies=$policy \
        --config.run_name=search_gpu1-$which ) > $OUT/b/run_${which}_engine.log 2>&1
    grep -i "attainment\|error" $OUT/b/run_${which}_engine.log | head; echo "t=$SECONDS"
  fi
  cp results/search_gpu1-$which/metrics.json $OUT/b/metrics_$which.json
done
left=$((560 - SECONDS))
if [ $left -gt 40 ]; then
  ( time timeout $left python3 experiments/probes/step_trace.py configs/validate_gpu.py $OUT/b/trace.json \
      chunked:15 chunked:60 prefill_first:15 ) > $OUT/b/trace.log 2>&1
  tail -4 $OUT/b/trace.log
fi
cd $OUT && tar czf b.tgz b && rm -rf b
