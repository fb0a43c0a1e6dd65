"""Tests of the TPU ragged paged attention kernel, run in TPU interpret mode on CPU, against the `jnp` reference.

The interpreter simulates VMEM, DMAs and semaphores: uninitialized buffers hold NaN, a DMA out of bounds raises,
and with `detect_races=True` a DMA that races a read or write of the same buffer is reported. Inputs come from
`ragged_inputs.make_inputs`: shuffled pages, NaN wherever nothing may be read, padding sequences and padding
query rows. Block sizes are small so that sequences straddle query blocks and prefixes span KV blocks; the
shape classes are those of the GPU kernels' tests (`test_mixed_batch`, `test_flash_prefill`,
`test_paged_decode`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import api, reference
from pallas_kernels.paged_decode import quantize_kv
from pallas_kernels.ragged_paged import BlockSizes, Generation, check_supported, pallas_tpu, ragged_paged_attention
from pallas_kernels.ragged_paged import tuning
from ragged_inputs import Case, make_inputs

_RACES = pltpu.InterpretParams(detect_races=True)
_reference = jax.jit(reference.ragged_paged_attention, static_argnames=("sm_scale", "sliding_window"))
# 8 query tokens per block at G=4, sub-tiles of 2 tokens (one float32 sublane tile), 2 pages of 4 per KV step.
_SMALL = BlockSizes(block_rows=32, sub_rows=8, block_kv=8)


def _races_found() -> bool:
  # The interpreter reports races on its module's state (the documented `races.races_found`).
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=import-outside-toplevel
  return bool(interpret_pallas_call.races and interpret_pallas_call.races.races_found)


def _compare(got, want, dtype, real_tokens):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  assert np.isfinite(got).all(), "NaN or inf leaked into the output"
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol / 10 if dtype == jnp.float32 else tol)
  assert not got[real_tokens:].any(), "padding rows must be zero"


def check(case: Case, dtype=jnp.float32, *, seed: int = 0, sliding_window=None, sizes=_SMALL, decode_only=False,
          races: bool = True):
  args = make_inputs(case, dtype, seed)
  sm_scale = case.head_dim ** -0.5
  got = ragged_paged_attention(*args, sm_scale=sm_scale, sliding_window=sliding_window, decode_only=decode_only,
                               interpret=_RACES if races else True, block_sizes=sizes)
  assert got.dtype == dtype
  with jax.default_matmul_precision("highest"):
    want = _reference(*args, sm_scale=sm_scale, sliding_window=sliding_window)
  _compare(got, want, dtype, sum(case.q_lens))
  if races:
    assert not _races_found(), "the interpreter found a race between a DMA and a read or write"


# Decodes behind prefixes of several KV blocks, interleaved with prompt chunks with and without a cached prefix;
# a length-1 prompt (prefix 0) is a decode as far as attention is concerned.
_MIXED = Case(q_lens=(1, 9, 1, 5, 1, 1), prefixes=(21, 0, 3, 12, 0, 40), group=4, page_size=4)

_CASES = {
    "mixed_g4": _MIXED,
    "decodes_g1": Case(q_lens=(1, 1, 1), prefixes=(30, 7, 0), group=1, page_size=8, pad_tokens=0),
    "chunks_g8": Case(q_lens=(6, 13), prefixes=(9, 0), group=8, num_kv_heads=1),
    # Lengths 1 and not a multiple of the block or the page; a chunk longer than a query block.
    "g1_ragged": Case(q_lens=(1, 7, 13), prefixes=(0, 5, 0), group=1, page_size=4),
    "g8_pages_larger_than_kv_block": Case(q_lens=(9, 2), prefixes=(0, 11), group=8, page_size=16, num_kv_heads=1),
    "g4_odd_page_size": Case(q_lens=(5, 12), prefixes=(7, 0), group=4, page_size=5),
    "g3_group_not_a_power_of_two": Case(q_lens=(3, 1, 6), prefixes=(4, 9, 0), num_kv_heads=2, group=3),
    # An empty chunk between two others, and a bucket much larger than the batch (whole blocks of padding).
    "empty_chunk_and_padding_blocks": Case(q_lens=(3, 0, 4), prefixes=(2, 5, 0), group=2, pad_tokens=40,
                                           pad_seqs=3),
    # Full pages only: every length a multiple of the page size.
    "full_pages": Case(q_lens=(4, 8), prefixes=(8, 0), group=2, page_size=4),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_matches_reference_f32(name):
  check(_CASES[name], seed=sorted(_CASES).index(name))


def test_matches_reference_bf16():
  # bfloat16 rows come in tiles of 16: sub-tiles of 4 tokens at G=4.
  check(_MIXED, jnp.bfloat16, seed=3, sizes=BlockSizes(block_rows=32, sub_rows=16, block_kv=8))


@pytest.mark.parametrize("max_sub_tiles", [0, 100], ids=["whole_blocks", "sub_tiles"])
def test_both_paths_of_a_block(max_sub_tiles):
  # 0: every sequence over the whole block (the prompt-chunk path); 100: every sequence tile by tile.
  sizes = BlockSizes(block_rows=32, sub_rows=8, block_kv=8, max_sub_tiles=max_sub_tiles)
  check(_MIXED, seed=4, sizes=sizes, races=False)


def test_one_kv_head_per_program():
  # Two KV heads in two programs of the grid's head axis, each copying its own head's pages.
  sizes = BlockSizes(block_rows=32, sub_rows=8, block_kv=8, kv_heads_per_block=1)
  check(_MIXED, seed=6, sizes=sizes)


def test_default_block_sizes():
  # The table's sizes (here the default: 128 rows, 512 keys): one query block and one KV block per sequence.
  check(Case(q_lens=(6, 1, 3), prefixes=(0, 20, 7), group=4, head_dim=64, page_size=16), seed=7, sizes=None,
        races=False)


@pytest.mark.parametrize("case,dtype", [
    (Case(q_lens=(1, 1, 1, 1), prefixes=(30, 7, 0, 13), group=4), jnp.float32),  # T > S: padding rows
    (Case(q_lens=(1, 1, 1), prefixes=(5, 20, 0), group=1, pad_seqs=3, pad_tokens=0), jnp.float32),  # T < S
    (Case(q_lens=(1, 1), prefixes=(44, 3), group=8, num_kv_heads=1, page_size=8), jnp.bfloat16),
], ids=["more_rows_g4", "more_slots_g1", "bf16_g8"])
def test_decode_only(case, dtype):
  # Padding slots carry junk kv_lens: only num_seqs says they are not real.
  sizes = BlockSizes(block_rows=32, sub_rows=8 if dtype == jnp.float32 else 16, block_kv=8)
  check(case, dtype, seed=len(case.q_lens), sizes=sizes, decode_only=True)


@pytest.mark.parametrize("case,window", [(_MIXED, 5), (_MIXED, 11), (Case(q_lens=(1, 1, 1), prefixes=(30, 7, 12),
                                                                          group=2), 5)],
                         ids=["mixed_w5", "mixed_w11", "decodes_w5"])
def test_sliding_window(case, window):
  # Windows shorter and longer than a KV block: whole blocks before the window are skipped.
  check(case, seed=window, sliding_window=window)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(pages, kind, granularity):
  """Quantizes pages; unowned (NaN) slots become 0 values with NaN per-token scales (still poisoned)."""
  finite = jnp.where(jnp.isnan(pages), 0.0, pages)
  values, scales = quantize_kv(finite, kind, granularity, head_axis=0)
  if granularity == "token":
    scales = jnp.where(jnp.isnan(pages[..., 0]), jnp.nan, scales)
  return values, scales


@pytest.mark.parametrize("kind,granularity,dtype", [("int8", "token", jnp.float32), ("fp8", "token", jnp.bfloat16),
                                                    ("int8", "head", jnp.bfloat16), ("fp8", "head", jnp.float32)])
def test_quantized_pages(kind, granularity, dtype):
  q, k, v, *rest = make_inputs(_MIXED, jnp.float32, seed=8)
  kq, ks = _quantize(k, kind, granularity)
  vq, vs = _quantize(v, kind, granularity)
  args = (q.astype(dtype), kq, vq, *rest)
  sizes = BlockSizes(block_rows=32, sub_rows=8 if dtype == jnp.float32 else 16, block_kv=8)
  got = ragged_paged_attention(*args, sm_scale=0.25, k_scales=ks, v_scales=vs, interpret=_RACES, block_sizes=sizes)
  with jax.default_matmul_precision("highest"):
    want = reference.ragged_paged_attention(*args, sm_scale=0.25, k_scales=ks, v_scales=vs)
  _compare(got, want, dtype, sum(_MIXED.q_lens))
  assert not _races_found()


def test_no_real_sequences_gives_zeros():
  args = list(make_inputs(Case(q_lens=(3,), prefixes=(2,)), jnp.float32, seed=5))
  args[-1] = jnp.asarray([0], jnp.int32)
  out = ragged_paged_attention(*args, sm_scale=0.25, interpret=True, block_sizes=_SMALL)
  assert np.isfinite(np.asarray(out)).all() and not np.asarray(out).any()


def test_seq_ranges_list_the_sequences_of_each_block():
  # q_lens 3, 0, 9, 1 over blocks of 4 tokens, 2 padding slots; the zero-length sequence 1 sits at token 3.
  cu_q_lens = jnp.asarray([0, 3, 3, 12, 13, 13, 13], jnp.int32)
  got = np.asarray(pallas_tpu.seq_ranges(cu_q_lens, jnp.asarray([4], jnp.int32), 5, 4)).reshape(5, 2)
  assert got.tolist() == [[0, 3], [2, 3], [2, 3], [3, 4], [4, 4]]


def test_unsupported_inputs_raise_not_implemented():
  q, k, v, *rest = make_inputs(Case(q_lens=(3,), prefixes=(0,)), jnp.float32, seed=1)
  with pytest.raises(NotImplementedError, match="q dtype"):
    ragged_paged_attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), *rest,
                           sm_scale=0.25, interpret=True)
  with pytest.raises(NotImplementedError, match="no scales"):
    ragged_paged_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), *rest, sm_scale=0.25, interpret=True)
  scales = jnp.ones(k.shape[0], jnp.float32)
  with pytest.raises(NotImplementedError, match="scaled pages"):
    ragged_paged_attention(q, k, v, *rest, sm_scale=0.25, k_scales=scales, v_scales=scales, interpret=True)
  # Compiled for a TPU, Mosaic's tiles add constraints the interpreter does not have.
  kv_lens, page_table, cu_q_lens, _ = rest
  with pytest.raises(NotImplementedError, match="head_dim=16"):
    check_supported(q, k, v, kv_lens, page_table, cu_q_lens, k_scales=None, v_scales=None, compiled=True)


def test_tuning_table():
  assert len(tuning.TABLE) == len(tuning.ENTRIES)
  key, config = tuning.ENTRIES[0]
  with pytest.raises(ValueError, match="duplicate"):
    tuning.build_table([(key, config), (key, config)])
  # No entry has been measured on its chip yet, and each says so.
  assert all(c.source.startswith(f"not measured on {k.generation.value}") for k, c in tuning.ENTRIES)
  assert {k.generation for k, _ in tuning.ENTRIES} == {Generation.V5E, Generation.V6E, Generation.V7}
  assert tuning.lookup(Generation.V6E, "bfloat16", "int8", 128).block_rows == 1024
  assert tuning.lookup(Generation.OTHER, "float32", "float32", 64).sub_rows == 8


def test_generation_from_device_kind():
  kinds = {"TPU v5 lite": Generation.V5E, "TPU v5e": Generation.V5E, "TPU v6 lite": Generation.V6E,
           "TPU v6e": Generation.V6E, "TPU7x": Generation.V7, "TPU v4": Generation.OTHER, "cpu": Generation.OTHER}
  assert {kind: Generation.from_device_kind(kind) for kind in kinds} == kinds


def test_plan_rows_are_whole_sublane_tiles():
  # G=3 at float32: units of 8 tokens (24 rows); at bfloat16, 16 tokens. A block is never larger than the batch.
  plan = pallas_tpu.make_plan((100, 6, 128), jnp.float32, (2, 64, 16, 128), jnp.float32, 8, _SMALL, "none")
  assert (plan.sub_q, plan.block_q, plan.block_rows % 8) == (8, 8, 0)
  plan = pallas_tpu.make_plan((100, 6, 128), jnp.bfloat16, (2, 64, 16, 128), jnp.bfloat16, 8,
                              BlockSizes(block_rows=256, sub_rows=16, block_kv=512), "none")
  assert (plan.sub_q, plan.block_q, plan.pages_per_block, plan.kv_heads_per_block) == (16, 80, 32, 2)
  plan = pallas_tpu.make_plan((5, 8, 128), jnp.bfloat16, (8, 64, 16, 128), jnp.bfloat16, 8,
                              BlockSizes(block_rows=256, sub_rows=16, block_kv=512), "none")
  assert plan.block_q == plan.block_rows == 16  # G=1: 16-token tiles; 5 tokens fit one block of 16


@pytest.mark.parametrize("kv_dtype,scales,window", [(jnp.bfloat16, None, None), (jnp.int8, "token", 4096),
                                                    (jnp.float8_e4m3fn, "head", None)])
def test_lowers_to_mosaic(kv_dtype, scales, window):
  """Lowers the compiled (not interpreted) kernel to a Mosaic TPU custom call on any machine, at a serving
  shape (bfloat16 queries, D=128, 32 query / 8 KV heads, 16-token pages): every operation has a Mosaic
  lowering. Mosaic's own compilation (layouts, VMEM) needs a TPU."""
  num_tokens, num_kv_heads, head_dim, page_size, num_slots, max_pages = 256, 8, 128, 32, 16, 64
  sds = jax.ShapeDtypeStruct
  kv = sds((num_kv_heads, 1024, page_size, head_dim), kv_dtype)
  scale_shape = {"token": kv.shape[:-1], "head": kv.shape[:1]}.get(scales)
  scale = sds(scale_shape, jnp.float32) if scale_shape else None
  args = (sds((num_tokens, 4 * num_kv_heads, head_dim), jnp.bfloat16), kv, kv, sds((num_slots,), jnp.int32),
          sds((num_slots, max_pages), jnp.int32), sds((num_slots + 1,), jnp.int32), sds((1,), jnp.int32))
  sizes = tuning.lookup(Generation.V6E, jnp.bfloat16, kv_dtype, head_dim)
  fn = functools.partial(pallas_tpu.ragged_paged_attention, sm_scale=head_dim ** -0.5, sliding_window=window,
                         block_sizes=sizes)
  lowered = jax.jit(lambda *a, ks=None, vs=None: fn(*a, k_scales=ks, v_scales=vs)).trace(
      *args, ks=scale, vs=scale).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


def test_api_chooses_the_tpu_kernel_in_tpu_interpret_mode():
  args = make_inputs(_MIXED, jnp.float32, seed=9)
  want = _reference(*args, sm_scale=0.25)
  assert api.kernel_platform() == jax.default_backend()
  with api.tpu_interpret_mode():
    assert api.kernel_platform() == "tpu"
    jaxpr = str(jax.make_jaxpr(functools.partial(api.ragged_paged_attention, sm_scale=0.25))(*args))
    assert "ragged_paged_attention_tpu" in jaxpr
    got = jax.jit(functools.partial(api.ragged_paged_attention, sm_scale=0.25, backend="pallas"))(*args)
    _compare(got, want, jnp.float32, sum(_MIXED.q_lens))
  assert api.kernel_platform() == jax.default_backend()
  if jax.default_backend() == "cpu":
    assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(api.ragged_paged_attention, sm_scale=0.25))(*args))


def test_dispatch_without_a_kernel_for_the_platform_runs_the_reference():
  # A bare loader is a GPU kernel's (the fused decode layer): on TPU "auto" takes the reference instead.
  def gpu_only():
    raise AssertionError("the GPU kernel was loaded on TPU")

  with api.tpu_interpret_mode():
    assert api.dispatch(gpu_only, lambda x: x + 1, "auto", 1) == 2
    assert api.dispatch({"gpu": gpu_only}, lambda x: x + 1, "auto", 1) == 2
    with pytest.raises(NotImplementedError, match="platform 'tpu'"):
      api.dispatch(gpu_only, lambda x: x + 1, "pallas", 1)
