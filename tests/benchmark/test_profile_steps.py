"""The step profiler's checks that run before it allocates (the profile itself needs a device's time)."""

import pytest

import pdopt
from pdopt.benchmark import profile_steps
from pdopt.engine.costs import model_sizes


def test_a_grid_too_large_for_the_device_is_refused_naming_max_batch():
  sizes = model_sizes(pdopt.preset("llama-3.1-8b", dtype="bfloat16"))
  gib = 2 ** 30
  # 128 sequences of 4096 tokens: about 33k pages of 16 tokens, 64.5 GiB of KV, beside 14 GiB of weights.
  with pytest.raises(ValueError, match=r"--max_batch=128 needs 78\.5 GiB .* smaller --max_batch"):
    profile_steps.check_fits(33040, 16, sizes, 60 * gib, max_batch=128)
  profile_steps.check_fits(16528, 16, sizes, 60 * gib, max_batch=64)  # Half the batch fits.
  profile_steps.check_fits(33040, 16, sizes, None, max_batch=128)  # Memory unknown (a CPU): not checked.
