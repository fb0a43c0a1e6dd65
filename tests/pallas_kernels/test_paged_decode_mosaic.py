"""Tests of the Mosaic GPU paged decode kernel (`pallas_kernels.paged_decode.pallas_mgpu`).

The kernel has no interpreter: on CPU the tests check its split arithmetic, the choice of implementation,
its input checks, and that it lowers to a Mosaic GPU custom call for CUDA; the `@pytest.mark.gpu` cases run
it on an sm_90 GPU against the `jnp` reference on shuffled, NaN-poisoned pages (`test_paged_decode._inputs`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cuda_lowering import lower_for_cuda
from test_paged_decode import Case, _assert_close, _inputs, _quantize, _reference

from pallas_kernels.gpu_info import on_hopper
from pallas_kernels.mosaic_util import SHARED_MEMORY_BYTES
from pallas_kernels.paged_decode import paged_decode, pallas_mgpu, ragged_decode
from pallas_kernels.paged_decode.common import split_range


@pytest.mark.parametrize("q_len,num_splits,block_kv", [(1, 1, 64), (1, 5, 128), (3, 4, 64), (5, 9, 128)])
def test_splits_cover_every_block_once(q_len, num_splits, block_kv):
  kv_lens = np.array([0, 1, 2, 63, 64, 65, 127, 128, 129, 700, 1000])
  covered = {}
  for split in range(num_splits):
    first, steps = split_range(jnp.asarray(kv_lens), q_len, split, num_splits, block_kv)
    for s, (f, n) in enumerate(zip(np.asarray(first), np.asarray(steps))):
      assert n >= 0
      covered.setdefault(s, []).extend(range(f, f + n))
  for s, n in enumerate(kv_lens):
    length = max(n, q_len) if n else 0
    assert sorted(covered.get(s, [])) == list(range(-(-length // block_kv))), (n, q_len)


def test_rejects_what_it_does_not_serve():
  k = jnp.zeros((2, 4, 16, 128), jnp.bfloat16)
  ok = dict(rows=8, sliding_window=None, k_scales=None, v_scales=None, config=pallas_mgpu.DecodeConfig())
  pallas_mgpu.check_supported(jnp.bfloat16, k, k, **ok)
  bad = [
      (dict(ok, rows=65), "65 query rows"),
      (dict(ok, sliding_window=8), "sliding window"),
      (dict(ok, k_scales=jnp.ones((2,))), "int8 with per-token scales"),
  ]
  for kwargs, match in bad:
    with pytest.raises(NotImplementedError, match=match):
      pallas_mgpu.check_supported(jnp.bfloat16, k, k, **kwargs)
  # int8 pages: per-token scales, head_dim 128, pages of 16 tokens or a multiple of 32.
  k8, scales = jnp.zeros((2, 4, 32, 128), jnp.int8), jnp.ones((2, 4, 32))
  quant = dict(ok, k_scales=scales, v_scales=scales)
  pallas_mgpu.check_supported(jnp.bfloat16, k8, k8, **quant)
  pallas_mgpu.check_supported(jnp.bfloat16, k8[:, :, :16], k8[:, :, :16], **dict(quant, k_scales=scales[..., :16],
                                                                               v_scales=scales[..., :16]))
  with pytest.raises(NotImplementedError, match="page_size of 16 or a multiple of 32"):
    pallas_mgpu.check_supported(jnp.bfloat16, k8[:, :, :8], k8[:, :, :8], **dict(quant, k_scales=scales[..., :8],
                                                                               v_scales=scales[..., :8]))
  with pytest.raises(NotImplementedError, match="per-token scales"):
    pallas_mgpu.check_supported(jnp.bfloat16, k8, k8, **dict(quant, v_scales=jnp.ones((2,))))
  with pytest.raises(NotImplementedError, match="int8"):
    pallas_mgpu.check_supported(jnp.bfloat16, k8.astype(jnp.float8_e4m3fn), k8.astype(jnp.float8_e4m3fn), **quant)
  with pytest.raises(NotImplementedError, match="bfloat16 queries for int8"):
    pallas_mgpu.check_supported(jnp.float16, k8, k8, **quant)
  with pytest.raises(NotImplementedError, match="float32"):
    pallas_mgpu.check_supported(jnp.float32, k, k, **ok)
  with pytest.raises(NotImplementedError, match="head_dim 64 or 128, got 32"):
    pallas_mgpu.check_supported(jnp.bfloat16, k[..., :32], k[..., :32], **ok)
  with pytest.raises(NotImplementedError, match="page_size"):
    pallas_mgpu.check_supported(jnp.bfloat16, k[:, :, :12], k[:, :, :12], **ok)
  with pytest.raises(NotImplementedError, match="shared memory"):
    pallas_mgpu.check_supported(jnp.bfloat16, k, k, **dict(ok, config=pallas_mgpu.DecodeConfig(256, 4)))
  for kwargs in (dict(num_stages=5), dict(num_stages=1), dict(num_stages=3, consumers=2), dict(consumers=4),
                 dict(producer_warps=3)):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      pallas_mgpu.DecodeConfig(**kwargs)
  # Defaults: 3 consumers for int8 pages where the ring and shared memory allow, else 2; one ring slot per
  # consumer.
  def resolved(config, quantized, rows=8):
    config = config.resolve(quantized, 128, rows)
    return config.consumers, config.num_stages
  assert resolved(pallas_mgpu.DecodeConfig(), True) == (3, 3)
  assert resolved(pallas_mgpu.DecodeConfig(), True, rows=40) == (2, 2)  # N = 64: 3 consumers do not fit
  assert resolved(pallas_mgpu.DecodeConfig(), True, rows=24) == (2, 2)  # N = 32: 3 not measured there
  assert resolved(pallas_mgpu.DecodeConfig(num_stages=3), True) == (3, 3)
  assert resolved(pallas_mgpu.DecodeConfig(), False) == (2, 2)
  assert resolved(pallas_mgpu.DecodeConfig(64, 4), True) == (2, 4)
  assert resolved(pallas_mgpu.DecodeConfig(consumers=3), False) == (3, 3)
  # Two TMA warps for int8 pages (a page-16 block is 32 copies), one for bf16.
  assert pallas_mgpu.DecodeConfig().resolve(True).producer_warps == 2
  assert pallas_mgpu.DecodeConfig().resolve(False).producer_warps == 1
  assert pallas_mgpu.DecodeConfig(producer_warps=4).resolve(False).producer_warps == 4
  with pytest.raises(ValueError, match="num_stages=3 needs a multiple of the consumer count"):
    pallas_mgpu.DecodeConfig(64, 3).resolve(False)
  for block_kv in (96, 320):
    with pytest.raises(ValueError, match="block_kv"):
      pallas_mgpu.DecodeConfig(block_kv=block_kv)
  # The int8 kernel's transposed tiles grow with the query rows: 40 rows (N = 64) do not fit block_kv 256.
  with pytest.raises(NotImplementedError, match="shared memory"):
    pallas_mgpu.check_supported(jnp.bfloat16, k8, k8, **dict(quant, rows=40, config=pallas_mgpu.DecodeConfig(256, 2)))
  pallas_mgpu.check_supported(jnp.bfloat16, k8, k8, **dict(quant, rows=40, config=pallas_mgpu.DecodeConfig(128, 2)))
  # What Mosaic GPU reserves counts: this config's buffers alone fit, with the reduction scratch they do not.
  config = pallas_mgpu.DecodeConfig(192, 4)
  assert pallas_mgpu.shared_memory_bytes(64, 2, config) > SHARED_MEMORY_BYTES
  with pytest.raises(NotImplementedError, match="shared memory"):
    pallas_mgpu.check_supported(jnp.bfloat16, k[..., :64], k[..., :64], **dict(ok, config=config))


def test_implementation_choice_off_hopper():
  """Off an sm_90 GPU the default is the Triton kernel; asking for the Mosaic one with Triton arguments is
  an error naming them."""
  case = Case(group=2, q_len=1, page_size=8, kv_lens=(5, 9), max_pages=2, num_splits=1)
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(0), case, jnp.float32)
  q, k, v = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  got = paged_decode(q, k, v, kv_lens, table, sm_scale=0.25, interpret=True)
  want = paged_decode(q, k, v, kv_lens, table, sm_scale=0.25, interpret=True, implementation="triton")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="interpret"):
    paged_decode(q, k, v, kv_lens, table, sm_scale=0.25, interpret=True, implementation="mosaic")
  with pytest.raises(ValueError, match="unknown paged_decode implementation"):
    paged_decode(q, k, v, kv_lens, table, sm_scale=0.25, implementation="cuda")


@pytest.mark.parametrize("q_len,group,head_dim,page_size,config,num_splits", [
    (1, 4, 128, 16, pallas_mgpu.DecodeConfig(), 2),
    (1, 4, 128, 32, pallas_mgpu.DecodeConfig(), 1),
    (5, 8, 64, 64, pallas_mgpu.DecodeConfig(64, 4), 3),
    (2, 1, 128, 256, pallas_mgpu.DecodeConfig(128, 2), 1),
    (3, 4, 128, 16, pallas_mgpu.DecodeConfig(64, 3, consumers=3), 4),
    (1, 8, 128, 64, pallas_mgpu.DecodeConfig(128, 3, consumers=3), 2),
    (2, 4, 128, 16, pallas_mgpu.DecodeConfig(128, 4, consumers=2, producer_warps=4), 2),
    (1, 4, 64, 32, pallas_mgpu.DecodeConfig(producer_warps=2), 1),
])
@pytest.mark.parametrize("int8", [False, True])
def test_lowers_for_cuda(q_len, group, head_dim, page_size, config, num_splits, int8):
  """Lowers the kernel to its Mosaic GPU custom call for CUDA on any machine (layouts, TMA shapes and barrier
  use are checked here; PTX is only generated on a GPU)."""
  if int8 and head_dim != 128:
    pytest.skip("int8 pages need head_dim 128")
  if (pallas_mgpu.shared_memory_bytes(head_dim, 2, config, 1 if int8 else 2, q_len * group)
      > SHARED_MEMORY_BYTES):
    pytest.skip(f"{config} does not fit in shared memory with {'int8' if int8 else 'bf16'} pages")
  num_kv_heads, num_seqs = 2, 3
  sds = jax.ShapeDtypeStruct
  kv = sds((num_kv_heads, 40, page_size, head_dim), jnp.int8 if int8 else jnp.bfloat16)
  scales = (sds((num_kv_heads, 40, page_size), jnp.float32),) * 2 if int8 else ()
  args = (sds((num_seqs, q_len * num_kv_heads * group, head_dim), jnp.bfloat16), kv, kv,
          sds((num_seqs,), jnp.int32), sds((num_seqs, 9), jnp.int32), *scales)
  fn = lambda *a: pallas_mgpu.decode_partials(*a, q_len=q_len, sm_scale=head_dim**-0.5, num_splits=num_splits,
                                              config=config)
  assert "mosaic_gpu" in lower_for_cuda(fn, args)


_GPU_CASES = {
    # Lengths 1, partial pages, a padding sequence, more splits than blocks, a table width that is not a
    # multiple of the block.
    "g4_q1_page16": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 300, 790, 17, 0), max_pages=50,
                          num_splits=None, head_dim=128), jnp.bfloat16, None),
    # One and two blocks per split (the second consumer warpgroup with no block, and with one).
    "g4_q1_page16_short_splits": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 129, 250), max_pages=16,
                                       num_splits=2, head_dim=128), jnp.bfloat16, None),
    "g1_q2_f16_splits7": (Case(group=1, q_len=2, page_size=16, kv_lens=(2, 129, 500), max_pages=33,
                               num_splits=7, head_dim=128), jnp.float16, None),
    "g8_q5_d64_page64_bkv64": (Case(group=8, q_len=5, page_size=64, kv_lens=(5, 64, 65, 1000), max_pages=17,
                                    num_splits=3, head_dim=64), jnp.bfloat16, pallas_mgpu.DecodeConfig(64, 4)),
    "g4_q1_one_split": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 300, 0, 17), max_pages=50,
                             num_splits=1, head_dim=64), jnp.bfloat16, None),
    "g8_q4_one_split": (Case(group=8, q_len=4, page_size=64, kv_lens=(4, 70, 1000), max_pages=17, num_splits=1,
                             head_dim=128), jnp.float16, pallas_mgpu.DecodeConfig(64, 4)),
    "g4_q1_bkv64_c3": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 65, 300, 790), max_pages=50, num_splits=2,
                            head_dim=128), jnp.bfloat16, pallas_mgpu.DecodeConfig(64, 3, consumers=3)),
    "g4_q1_two_tma_warps": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 65, 300, 790), max_pages=50,
                                 num_splits=2, head_dim=128), jnp.bfloat16, pallas_mgpu.DecodeConfig(producer_warps=2)),
    "g4_q3_page_larger_than_block": (Case(group=4, q_len=3, page_size=256, kv_lens=(3, 255, 257, 900),
                                          max_pages=4, num_splits=2, head_dim=128), jnp.bfloat16,
                                     pallas_mgpu.DecodeConfig(64, 4)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("name", sorted(_GPU_CASES))
def test_gpu_matches_reference(name):
  case, dtype, config = _GPU_CASES[name]
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(len(name)), case, jnp.float32)
  want = _reference(case, q.astype(dtype), k.astype(dtype), v.astype(dtype), kv_lens, table)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  got = paged_decode(q, k, v, kv_lens, table, sm_scale=case.head_dim**-0.5, num_splits=case.num_splits,
                     implementation="mosaic", mosaic_config=config)
  assert got.dtype == dtype
  _assert_close(got, want, 2e-2)
  assert not np.asarray(got, np.float32)[np.asarray(kv_lens) == 0].any()


_INT8_CASES = {
    "g4_q1_page32": (Case(group=4, q_len=1, page_size=32, kv_lens=(1, 300, 790, 17, 0), max_pages=30,
                          num_splits=None, head_dim=128), None),
    "g8_q3_page64_one_split": (Case(group=8, q_len=3, page_size=64, kv_lens=(3, 64, 65, 1000), max_pages=17,
                                    num_splits=1, head_dim=128), pallas_mgpu.DecodeConfig(64, 4)),
    "g1_q2_page256_splits3": (Case(group=1, q_len=2, page_size=256, kv_lens=(2, 255, 900), max_pages=4,
                                   num_splits=3, head_dim=128), pallas_mgpu.DecodeConfig(128, 2)),
    # 16-token pages: each scale copy brings its next page's scales along, into alternating buffers; the last
    # page of the pool reads past the end of the scales.
    "g4_q1_page16": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 300, 790, 17, 0), max_pages=50,
                          num_splits=None, head_dim=128), None),
    "g4_q2_page16_bkv64_splits3": (Case(group=4, q_len=2, page_size=16, kv_lens=(2, 129, 250), max_pages=16,
                                        num_splits=3, head_dim=128), pallas_mgpu.DecodeConfig(64, 4)),
    # Three consumers (the default above), with splits of 1-4 blocks: consumers with no block, merges of 2-3
    # partials.
    "g4_q1_page16_bkv64_c3": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 129, 250, 700), max_pages=50,
                                   num_splits=3, head_dim=128), pallas_mgpu.DecodeConfig(64, 3, consumers=3)),
    # The copy jobs on one TMA warp, and on four (K values, V values, K scales, V scales each on its own).
    "g4_q1_page16_one_tma_warp": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 129, 250, 700), max_pages=50,
                                       num_splits=2, head_dim=128), pallas_mgpu.DecodeConfig(producer_warps=1)),
    "g4_q2_page16_four_tma_warps": (Case(group=4, q_len=2, page_size=16, kv_lens=(2, 129, 250, 900),
                                         max_pages=60, num_splits=2, head_dim=128),
                                    pallas_mgpu.DecodeConfig(128, 4, consumers=2, producer_warps=4)),
    # 40 query rows: the transposed tiles' widest N (64).
    "g8_q5_page32_rows40": (Case(group=8, q_len=5, page_size=32, kv_lens=(5, 33, 700), max_pages=30,
                                 num_splits=2, head_dim=128), None),
    # One split: the kernel transposes O^T itself and writes q's rows (N = 16 with three consumers, N = 64).
    "g4_q1_page16_one_split": (Case(group=4, q_len=1, page_size=16, kv_lens=(1, 300, 0, 790), max_pages=50,
                                    num_splits=1, head_dim=128), None),
    "g8_q5_page32_rows40_one_split": (Case(group=8, q_len=5, page_size=32, kv_lens=(5, 0, 700), max_pages=30,
                                           num_splits=1, head_dim=128), None),
}


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("name", sorted(_INT8_CASES))
def test_gpu_int8_matches_reference(name):
  """int8 pages with per-token scales (NaN scales in every unused slot) against the reference on the same
  quantized pages."""
  case, config = _INT8_CASES[name]
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(len(name)), case, jnp.float32)
  k, k_scales = _quantize(k, "int8", "token")
  v, v_scales = _quantize(v, "int8", "token")
  q = q.astype(jnp.bfloat16)
  want = _reference(case, q, k, v, kv_lens, table, k_scales=k_scales, v_scales=v_scales)
  run = functools.partial(paged_decode, q, k, v, kv_lens, table, sm_scale=case.head_dim**-0.5, k_scales=k_scales,
                          v_scales=v_scales, implementation="mosaic", mosaic_config=config)
  got = run(num_splits=case.num_splits)
  assert got.dtype == jnp.bfloat16
  _assert_close(got, want, 2e-2)
  assert not np.asarray(got, np.float32)[np.asarray(kv_lens) == 0].any()
  if case.num_splits == 1:  # the kernel's own output against the combine of two splits' partials
    two = np.asarray(run(num_splits=2), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), two, rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs an sm_90 GPU")
def test_gpu_ragged_decode_defaults_to_mosaic_and_matches_triton():
  case = Case(group=4, q_len=1, page_size=16, kv_lens=(40, 1, 333), max_pages=24, num_splits=None, head_dim=128)
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(3), case, jnp.bfloat16)
  q, k, v = q[:, 0].astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  q = jnp.concatenate([q, jnp.full((2,) + q.shape[1:], jnp.nan, q.dtype)])  # padding rows
  got = ragged_decode(q, k, v, kv_lens, table, sm_scale=0.125)
  want = ragged_decode(q, k, v, kv_lens, table, sm_scale=0.125, implementation="triton")
  _assert_close(got[:3], want[:3], 2e-2)
  assert not np.asarray(got[3:], np.float32).any()
