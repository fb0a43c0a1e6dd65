#!/bin/bash
# [PYTHON=.venv/bin/python] bash experiments/probes/sim_instructions.sh LABEL RATE NUM_REQUESTS: the instructions
# one simulation takes (`sim_instructions.py`), as the count of the whole run less that of a run that stops
# before simulating.
count() {
  PYTHONHASHSEED=0 JAX_PLATFORMS=cpu PYTHONPATH=$PWD valgrind --tool=cachegrind --cache-sim=no \
    --cachegrind-out-file=/dev/null ${PYTHON:-python} experiments/probes/sim_instructions.py "$@" 2>&1 \
    | grep -E "I +refs" | awk '{gsub(",", "", $NF); print $NF}'
}
all=$(count "$@") && setup=$(count "$@" --setup-only) || exit 1
echo "$1 at $2 req/s, $3 requests: $(( (all - setup) / 1000000 )) M instructions"
