"""Tests of the flash prefill kernel against the `jnp` reference.

On CPU the kernel runs in the Pallas interpreter; `@pytest.mark.gpu` cases compile it for the GPU and skip
elsewhere. Inputs are fresh random arrays; every KV slot no sequence owns (unused pages, slots past a
sequence's length, page-table entries past its last page) and every padding query row is NaN, so a read
out of bounds or a masked value leaking into a sum fails the comparison.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.flash_prefill import flash_prefill
from pallas_kernels.flash_prefill import tuning
from cuda_lowering import lower_for_cuda
from ragged_inputs import Case, make_inputs

_ON_GPU = jax.default_backend() == "gpu"
# One compilation per shape instead of op-by-op dispatch (which costs seconds per new shape on CPU).
_reference = jax.jit(reference.ragged_paged_attention, static_argnames=("sm_scale", "sliding_window"))


def check(case: Case, dtype, seed: int, *, interpret: bool, sliding_window=None, **blocks):
  args = make_inputs(case, dtype, seed)
  sm_scale = case.head_dim ** -0.5
  got = flash_prefill(*args, sm_scale=sm_scale, sliding_window=sliding_window, interpret=interpret,
                      **blocks)
  want = _reference(*args, sm_scale=sm_scale, sliding_window=sliding_window)
  assert got.shape == want.shape and got.dtype == want.dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all(), "NaN or inf leaked into the output"
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
  # Padding rows are exactly zero.
  real_tokens = sum(case.q_lens)
  assert not got[real_tokens:].any()


# (case, block_q, block_k): lengths 1 and non-multiples of block and page, prefixes 0 and more, G 1/4/8.
_CASES = {
    "g1_ragged": (Case(q_lens=(1, 7, 13), prefixes=(0, 5, 0), group=1, page_size=4), 8, 8),
    "g4_prefix_blocks_span_pages": (Case(q_lens=(17, 1, 6), prefixes=(3, 20, 0), group=4, page_size=8),
                                    4, 16),
    "g8_pages_larger_than_block": (Case(q_lens=(9, 2), prefixes=(0, 11), group=8, page_size=16,
                                        num_kv_heads=1), 2, 8),
    "g4_odd_page_size": (Case(q_lens=(5, 12), prefixes=(7, 0), group=4, page_size=5), 8, 16),
    "g1_single_token_many_seqs": (Case(q_lens=(1, 1, 1, 1), prefixes=(0, 9, 3, 30), group=1,
                                       page_size=4, pad_tokens=0), 16, 16),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_matches_reference_f32(name):
  case, block_q, block_k = _CASES[name]
  seed = zlib.crc32(name.encode()) % 1000
  check(case, jnp.float32, seed=seed, interpret=True, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_reference_half(dtype):
  case = Case(q_lens=(10, 3), prefixes=(4, 0), group=4, head_dim=32, page_size=8)
  check(case, dtype, seed=7, interpret=True, block_q=4, block_k=16)


def test_default_blocks_from_table():
  # block sizes from the tuning table (larger than every sequence here: one block each).
  case = Case(q_lens=(6, 1), prefixes=(0, 2), group=4, head_dim=64)
  check(case, jnp.float32, seed=3, interpret=True)


def test_sliding_window():
  case = Case(q_lens=(11, 4), prefixes=(9, 0), group=2, page_size=4)
  check(case, jnp.float32, seed=11, interpret=True, sliding_window=6, block_q=4, block_k=8)


@pytest.mark.parametrize("prefetch_pages", [False, True])
def test_page_id_prefetch(prefetch_pages):
  case = Case(q_lens=(9, 3), prefixes=(6, 0), group=2, page_size=4)
  check(case, jnp.float32, seed=13, interpret=True, block_q=4, block_k=8, prefetch_pages=prefetch_pages)


def test_no_real_sequences_gives_zeros():
  args = list(make_inputs(Case(q_lens=(3,), prefixes=(2,)), jnp.float32, seed=5))
  args[-1] = jnp.asarray([0], jnp.int32)
  args[0] = jnp.nan_to_num(args[0])
  out = flash_prefill(*args, sm_scale=0.25, block_q=4, block_k=8, interpret=True)
  assert not np.asarray(out).any()


def test_quantized_pages_not_served():
  args = make_inputs(Case(q_lens=(3,), prefixes=(0,)), jnp.float32, seed=1)
  scales = jnp.ones(args[1].shape[0], jnp.float32)
  with pytest.raises(NotImplementedError):
    flash_prefill(*args, sm_scale=0.25, k_scales=scales, v_scales=scales, interpret=True)


def test_group_size_not_a_power_of_two_not_served():
  # 6 query heads over 2 KV heads: groups of 3 cannot form the kernel's power-of-two tiles; the API falls
  # back to the reference on NotImplementedError.
  args = make_inputs(Case(q_lens=(3,), prefixes=(0,), num_kv_heads=2, group=3), jnp.float32, seed=1)
  with pytest.raises(NotImplementedError, match="group size"):
    flash_prefill(*args, sm_scale=0.25, interpret=True)


def test_tuning_table_has_no_duplicate_keys():
  assert len(tuning.TABLE) == len(tuning.ENTRIES)
  key = tuning.TuningKey(128, 1, "bfloat16", tuning.Card.H100)
  config = tuning.BlockConfig(block_q=64, block_k=64, num_warps=4, num_stages=2)
  with pytest.raises(ValueError, match="duplicate"):
    tuning.build_table([(key, config), (key, config)])


@pytest.mark.parametrize("group", [1, 2, 4, 8, 32])
def test_float32_default_blocks_have_16_rows(group):
  # float32 runs without tensor cores; 128-row tiles spill and were 15-30x slower on an H200.
  config = tuning.lookup(64, group, "float32", tuning.Card.H200)
  assert config.block_q * group == max(16, group)
  assert tuning.lookup(64, group, "bfloat16", tuning.Card.OTHER).block_q * group >= 64


def test_card_from_device_kind():
  assert tuning.Card.from_device_kind("NVIDIA H100 80GB HBM3") is tuning.Card.H100
  assert tuning.Card.from_device_kind("NVIDIA H200") is tuning.Card.H200
  assert tuning.Card.from_device_kind("cpu") is tuning.Card.OTHER


@pytest.mark.parametrize("group,dtype", [(4, jnp.bfloat16), (1, jnp.float16)])
def test_lowers_for_cuda(group, dtype):
  """Lowers the real (non-interpreted) kernel to a Triton custom call for CUDA, on any machine."""
  num_tokens, num_kv_heads, head_dim, page_size, num_slots, max_pages = 256, 2, 128, 16, 3, 8
  sds = jax.ShapeDtypeStruct
  kv = sds((num_kv_heads, 32, page_size, head_dim), dtype)
  args = (sds((num_tokens, num_kv_heads * group, head_dim), dtype), kv, kv, sds((num_slots,), jnp.int32),
          sds((num_slots, max_pages), jnp.int32), sds((num_slots + 1,), jnp.int32), sds((1,), jnp.int32))
  fn = functools.partial(flash_prefill, sm_scale=head_dim ** -0.5, block_q=128 // group, block_k=64,
                         num_warps=8, num_stages=3)
  assert "__gpu$xla.gpu.triton" in lower_for_cuda(fn, args)


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_matches_reference(group, dtype):
  case = Case(q_lens=(1, 130, 77, 300), prefixes=(0, 64, 200, 17), num_kv_heads=2, group=group,
              head_dim=128, page_size=16, pad_tokens=5)
  check(case, dtype, seed=group, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU")
def test_gpu_f32_head_dim_64():
  case = Case(q_lens=(33, 1, 70), prefixes=(5, 40, 0), num_kv_heads=2, group=4, head_dim=64,
              page_size=16)
  check(case, jnp.float32, seed=2, interpret=False, block_q=16, block_k=32, num_stages=2)
