#!/bin/bash
# One GPU: the step-cost profiles of the Llama-3.2-1B and Llama-3.1-8B shapes on this card at the validation
# config's buckets (the shipped files' command), in $OUT; MODELS="llama-3.2-1b" profiles only the ones named.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TF_CPP_MIN_LOG_LEVEL=2
python3 -c "import jax; print(jax.devices()[0].device_kind, jax.__version__)"
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
for model in ${MODELS:-llama-3.2-1b llama-3.1-8b}; do  # 8B: decode batches up to 64 fit an 80 GB card, 128 a 141 GB one
  batch=$([ $model = llama-3.1-8b ] && [ "$mib" -lt 100000 ] && echo 64 || echo 128)
  ( time python3 -m experiments.profile_steps --model=$model --out=$OUT/${model}_gpu.json --max_batch=$batch \
      --token_buckets=64,256,1024,2048 --seq_buckets=16,64,128 --page_buckets=64,256 ) > $OUT/profile_$model.log 2>&1
  tail -5 $OUT/profile_$model.log
done
