"""Tests of the mixed-batch dispatch (decode kernel + prefill kernel) against the `jnp` reference.

On CPU both kernels run in the Pallas interpreter. Inputs come from `ragged_inputs.make_inputs`: shuffled
pages, NaN wherever nothing may be read, padding sequences and padding query rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api, reference
from pallas_kernels.mixed_batch import single_query_mask, mixed_batch_attention
from pallas_kernels.paged_decode import quantize_kv
from ragged_inputs import Case, make_inputs

_ON_GPU = jax.default_backend() == "gpu"
_reference = jax.jit(reference.ragged_paged_attention, static_argnames=("sm_scale", "sliding_window"))


def _compare(got, want, dtype, real_tokens):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all(), "NaN or inf leaked into the output"
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol / 10 if dtype == jnp.float32 else tol)
  assert not got[real_tokens:].any(), "padding rows must be zero"


# Decodes (q_len 1, behind prefixes of several pages) interleaved with prompt chunks with and without a
# cached prefix; a length-1 prompt (prefix 0) is a decode as far as the dispatch is concerned.
_MIXED = Case(q_lens=(1, 9, 1, 5, 1, 1), prefixes=(21, 0, 3, 12, 0, 40), group=4, page_size=4)


@pytest.mark.parametrize("case", [
    _MIXED,
    Case(q_lens=(1, 1, 1), prefixes=(30, 7, 0), group=1, page_size=8, pad_tokens=0),  # decodes only
    Case(q_lens=(6, 13), prefixes=(9, 0), group=8, num_kv_heads=1),  # chunks only
], ids=["mixed_g4", "decodes_g1", "chunks_g8"])
def test_matches_reference_f32(case):
  args = make_inputs(case, jnp.float32, seed=sum(case.q_lens))
  got = mixed_batch_attention(*args, sm_scale=0.25, interpret=True)
  _compare(got, _reference(*args, sm_scale=0.25), jnp.float32, sum(case.q_lens))


def test_matches_reference_bf16():
  args = make_inputs(_MIXED, jnp.bfloat16, seed=3)
  got = mixed_batch_attention(*args, sm_scale=0.25, interpret=True)
  assert got.dtype == jnp.bfloat16
  _compare(got, _reference(*args, sm_scale=0.25), jnp.bfloat16, sum(_MIXED.q_lens))


@pytest.mark.parametrize("case,dtype", [
    (Case(q_lens=(1, 1, 1, 1), prefixes=(30, 7, 0, 13), group=4), jnp.float32),  # T > S: padding rows
    (Case(q_lens=(1, 1, 1), prefixes=(5, 20, 0), group=1, pad_seqs=3, pad_tokens=0), jnp.float32),  # T < S
    (Case(q_lens=(1, 1), prefixes=(44, 3), group=8, num_kv_heads=1, page_size=8), jnp.bfloat16),
], ids=["more_rows_g4", "more_slots_g1", "bf16_g8"])
def test_decode_only_runs_the_decode_kernel_alone(case, dtype):
  # Padding slots carry junk kv_lens: only num_seqs says they are not real.
  args = make_inputs(case, dtype, seed=len(case.q_lens))
  got = mixed_batch_attention(*args, sm_scale=0.25, decode_only=True, interpret=True)
  assert got.shape == args[0].shape and got.dtype == dtype
  _compare(got, _reference(*args, sm_scale=0.25), dtype, len(case.q_lens))
  jaxpr = str(jax.make_jaxpr(lambda *a: mixed_batch_attention(*a, sm_scale=0.25, decode_only=True,
                                                              interpret=True))(*args))
  assert jaxpr.count("pallas_call") == 1 and "name=paged_decode_q1" in jaxpr


def test_quantized_pages_decodes_in_kernel_chunks_in_reference():
  q, k, v, *rest = make_inputs(_MIXED, jnp.float32, seed=5)
  k8, ks = quantize_kv(k, "int8", head_axis=0)
  v8, vs = quantize_kv(v, "int8", head_axis=0)
  args = (q, k8, v8, *rest)
  got = mixed_batch_attention(*args, sm_scale=0.25, k_scales=ks, v_scales=vs, interpret=True)
  want = reference.ragged_paged_attention(*args, sm_scale=0.25, k_scales=ks, v_scales=vs)
  _compare(got, want, jnp.float32, sum(_MIXED.q_lens))


@pytest.mark.parametrize("case", [_MIXED, Case(q_lens=(1, 1, 1), prefixes=(30, 7, 12), group=2)],
                         ids=["mixed", "decode_only"])
def test_sliding_window_runs_everything_in_the_prefill_kernel(case):
  # The decode kernel has no sliding window, decode-only batches included: they take the general path.
  args = make_inputs(case, jnp.float32, seed=9)
  decode_only = max(case.q_lens) == 1
  got = mixed_batch_attention(*args, sm_scale=0.25, sliding_window=5, decode_only=decode_only, interpret=True)
  _compare(got, _reference(*args, sm_scale=0.25, sliding_window=5), jnp.float32, sum(case.q_lens))


def test_decode_mask_ignores_padding_slots():
  cu_q_lens = jnp.asarray([0, 1, 4, 5, 5, 5], jnp.int32)  # q_lens 1, 3, 1, then padding slots of 0
  got = single_query_mask(cu_q_lens, jnp.asarray([3], jnp.int32))
  assert got.tolist() == [True, False, True, False, False]
  got = single_query_mask(cu_q_lens, jnp.asarray([2], jnp.int32))
  assert got.tolist() == [True, False, False, False, False]


def test_api_backends_on_cpu():
  args = make_inputs(_MIXED, jnp.float32, seed=1)
  if _ON_GPU:
    pytest.skip("checks the CPU dispatch")
  auto = api.ragged_paged_attention(*args, sm_scale=0.25)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(_reference(*args, sm_scale=0.25)))
  with pytest.raises(NotImplementedError, match="no Pallas kernel"):
    api.ragged_paged_attention(*args, sm_scale=0.25, backend="pallas")


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,pad_tokens", [(jnp.float32, 5), (jnp.bfloat16, 5), (jnp.bfloat16, 250)])
def test_gpu_matches_reference(dtype, pad_tokens):
  # 250 padding rows: a shape bucket much larger than the batch, as the engine pads them.
  case = Case(q_lens=(1, 200, 1, 1, 77, 1), prefixes=(700, 64, 2000, 5, 0, 129), num_kv_heads=2, group=4,
              head_dim=128, page_size=16, pad_tokens=pad_tokens)
  args = make_inputs(case, dtype, seed=11)
  got = api.ragged_paged_attention(*args, sm_scale=128 ** -0.5, backend="pallas")
  _compare(got, _reference(*args, sm_scale=128 ** -0.5), dtype, sum(case.q_lens))
