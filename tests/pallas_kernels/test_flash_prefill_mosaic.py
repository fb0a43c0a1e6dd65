"""Tests of the Mosaic GPU flash prefill kernel (`pallas_kernels.flash_prefill.pallas_mgpu`).

The kernel has no interpreter: on CPU the tests check its work decomposition (`item_table`), the choice of
implementation, its input checks, and that it lowers to a Mosaic GPU custom call for CUDA; the
`@pytest.mark.gpu` cases run it on an sm_90 GPU against the `jnp` reference, with every KV slot no sequence
owns and every padding query row NaN-poisoned (see `ragged_inputs`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.flash_prefill import flash_prefill
from pallas_kernels.flash_prefill import pallas_mgpu
from pallas_kernels.gpu_info import on_hopper
from cuda_lowering import lower_for_cuda
from ragged_inputs import Case, make_inputs

_reference = jax.jit(reference.ragged_paged_attention, static_argnames=("sm_scale", "sliding_window"))


@pytest.mark.parametrize("q_lens,prefixes,pad_tokens", [
    ((1, 130, 77, 300), (0, 64, 200, 17), 5),
    ((128, 256), (0, 3), 0),
    ((), (), 7),
])
def test_item_table_covers_every_row_once(q_lens, prefixes, pad_tokens):
  num_slots = len(q_lens) + 2
  num_tokens = sum(q_lens) + pad_tokens
  cu = np.zeros(num_slots + 1, np.int32)
  cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
  cu[len(q_lens) + 1:] = sum(q_lens)
  kv_lens = np.zeros(num_slots, np.int32)
  kv_lens[:len(q_lens)] = np.asarray(q_lens, int) + np.asarray(prefixes, int)
  kv_lens[len(q_lens):] = 99  # junk in padding slots
  items = np.asarray(pallas_mgpu.item_table(jnp.asarray(cu), jnp.asarray(kv_lens), jnp.asarray([len(q_lens)]),
                                            num_tokens=num_tokens))
  covered = np.zeros(num_tokens, int)
  for seq, first_row, rows, pos, kv_len in items:
    assert 0 <= rows <= 128
    covered[first_row:first_row + rows] += 1
    if rows and seq < len(q_lens):  # a real sequence: positions continue its prefix
      assert kv_len == kv_lens[seq]
      assert pos == prefixes[seq] + first_row - cu[seq]
    elif rows:  # the padding pseudo-sequence: no keys
      assert kv_len == 0 and first_row >= sum(q_lens)
  np.testing.assert_array_equal(covered, 1)
  costs = [(pos + rows) if kv_len else 0 for _, _, rows, pos, kv_len in items if rows]
  assert costs == sorted(costs, reverse=True)  # heaviest first


@pytest.mark.parametrize("block_kv", [64, 128, 256])
def test_consumer_steps_cover_the_visible_keys_and_never_go_negative(block_kv):
  """Each consumer warpgroup visits exactly the key blocks its real rows can see; with no real rows or no
  keys (the padding pseudo-sequence, whose positions are negative) it visits none. A negative count would
  make the two warpgroups disagree on the barrier sequence and hang the kernel."""
  rng = np.random.default_rng(block_kv)
  for _ in range(40):
    num_seqs = int(rng.integers(0, 4))
    q_lens = rng.integers(1, 300, num_seqs)
    prefixes = rng.integers(0, 400, num_seqs) * rng.integers(0, 2, num_seqs)
    pad = int(rng.integers(0, 400))
    num_tokens = int(q_lens.sum()) + pad
    cu = np.concatenate([[0], np.cumsum(q_lens), [q_lens.sum()]]).astype(np.int32)
    kv_lens = np.concatenate([q_lens + prefixes, [7]]).astype(np.int32)
    items = np.asarray(pallas_mgpu.item_table(jnp.asarray(cu), jnp.asarray(kv_lens), jnp.asarray([num_seqs]),
                                              num_tokens=max(num_tokens, 1)))
    for w in range(2):
      steps = np.asarray(pallas_mgpu.consumer_steps(items[:, 2], items[:, 3], items[:, 4], w, block_kv))
      assert (steps >= 0).all()
      for (_, _, rows, pos, kv_len), got in zip(items, steps):
        real = np.arange(w * 64, min(rows, (w + 1) * 64))  # this warpgroup's real rows
        visible = min(pos + real.max() + 1, kv_len) if real.size else 0  # keys 0 .. visible - 1
        assert got == -(-max(visible, 0) // block_kv), (rows, pos, kv_len, w)


@pytest.mark.parametrize("num_kv_heads,group,head_chunk", [(8, 4, 1), (8, 4, 2), (8, 4, 8), (32, 1, 4), (3, 2, 3)])
def test_program_slots_cover_every_head_and_item_once(num_kv_heads, group, head_chunk):
  num_items = 7
  program = jnp.arange(num_kv_heads * group * num_items, dtype=jnp.int32)
  head, item = map(np.asarray, pallas_mgpu.program_slot(program, group=group, head_chunk=head_chunk,
                                                        num_items=num_items))
  assert sorted(zip(head.tolist(), item.tolist())) == [(h, i) for h in range(num_kv_heads * group)
                                                       for i in range(num_items)]
  # A chunk's programs are contiguous and hold its KV heads only; within it items run heaviest first.
  chunk_programs = head_chunk * group * num_items
  assert (head // group // head_chunk == program // chunk_programs).all()
  assert (np.diff(item.reshape(-1, chunk_programs), axis=1) >= 0).all()


def test_rejects_what_it_does_not_serve():
  case = Case(q_lens=(5,), prefixes=(0,), group=2, head_dim=64, page_size=16)
  q, k, v, *_ = make_inputs(case, jnp.bfloat16, seed=0)
  check = lambda **kw: pallas_mgpu.check_supported(
      kw.pop("q", q), kw.pop("k", k), kw.pop("v", v), sliding_window=kw.pop("sliding_window", None),
      k_scales=None, v_scales=None, config=kw.pop("config", pallas_mgpu.MosaicConfig()))
  check()
  check(config=pallas_mgpu.MosaicConfig(128, 3))  # 128 KB at head_dim 64
  with pytest.raises(NotImplementedError, match="shared memory at head_dim 128"):
    wide = jnp.concatenate([q, q], axis=-1), jnp.concatenate([k, k], axis=-1)
    check(q=wide[0], k=wide[1], v=wide[1], config=pallas_mgpu.MosaicConfig(128, 3))
  with pytest.raises(NotImplementedError, match="float32"):
    check(q=q.astype(jnp.float32), k=k.astype(jnp.float32), v=v.astype(jnp.float32))
  with pytest.raises(NotImplementedError, match="head_dim 64 or 128, got 32"):
    check(q=q[..., :32], k=k[..., :32], v=v[..., :32])
  with pytest.raises(NotImplementedError, match="sliding window"):
    check(sliding_window=8)
  with pytest.raises(NotImplementedError, match="page_size .* got 4"):
    check(k=k.reshape(k.shape[0], -1, 4, 64), v=v.reshape(v.shape[0], -1, 4, 64))
  with pytest.raises(ValueError, match="block_kv"):
    pallas_mgpu.MosaicConfig(block_kv=96)
  with pytest.raises(ValueError, match=r"num_stages must be in \[2, 4\], got 1"):
    pallas_mgpu.MosaicConfig(num_stages=1)
  with pytest.raises(ValueError, match=r"got 5"):  # two named barriers per ring slot, 16 per CTA
    pallas_mgpu.MosaicConfig(num_stages=5)
  with pytest.raises(ValueError, match="head_chunk must be positive, got 0"):
    pallas_mgpu.MosaicConfig(head_chunk=0)
  with pytest.raises(ValueError, match="head_chunk 3 does not divide the 2 KV heads"):
    check(config=pallas_mgpu.MosaicConfig(head_chunk=3))


def test_implementation_choice():
  case = Case(q_lens=(5, 2), prefixes=(3, 0), group=2, page_size=8)
  args = make_inputs(case, jnp.float32, seed=1)
  with pytest.raises(ValueError, match="unknown flash_prefill implementation 'cudnn'"):
    flash_prefill(*args, sm_scale=0.25, implementation="cudnn")
  with pytest.raises(ValueError, match="interpret"):
    flash_prefill(*args, sm_scale=0.25, implementation="mosaic", interpret=True)
  # Off an sm_90 GPU the automatic choice is the Triton kernel (here in the interpreter).
  got = flash_prefill(*args, sm_scale=0.25, interpret=True)
  want = flash_prefill(*args, sm_scale=0.25, implementation="triton", interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Tuning arguments passed as None count as not given.
  got = flash_prefill(*args, sm_scale=0.25, interpret=True, block_q=None, num_warps=None)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("head_dim,group,page_size,dtype,head_chunk", [
    (128, 4, 16, jnp.bfloat16, None),
    (64, 1, 256, jnp.float16, 1),
])
def test_lowers_for_cuda(head_dim, group, page_size, dtype, head_chunk):
  """Lowers the kernel to its Mosaic GPU custom call for CUDA, on any machine (layouts, TMA shapes and
  barrier use are checked at this point; PTX is only generated on a GPU)."""
  num_kv_heads, num_slots = 2, 3
  sds = jax.ShapeDtypeStruct
  kv = sds((num_kv_heads, 40, page_size, head_dim), dtype)
  args = (sds((301, num_kv_heads * group, head_dim), dtype), kv, kv, sds((num_slots,), jnp.int32),
          sds((num_slots, 9), jnp.int32), sds((num_slots + 1,), jnp.int32), sds((1,), jnp.int32))
  fn = lambda *a: pallas_mgpu.flash_prefill(*a, sm_scale=head_dim ** -0.5,
                                            config=pallas_mgpu.MosaicConfig(head_chunk=head_chunk))
  assert "mosaic_gpu" in lower_for_cuda(fn, args)


_GPU_CASES = {
    "g4_d128_page16": (Case(q_lens=(1, 130, 77, 300), prefixes=(0, 64, 200, 17), group=4, head_dim=128,
                            page_size=16, pad_tokens=5), jnp.bfloat16, None),
    "g1_d128_f16": (Case(q_lens=(1, 130, 77, 300), prefixes=(0, 64, 200, 17), group=1, head_dim=128,
                         page_size=16, pad_tokens=5), jnp.float16, None),
    "g8_d64_page64": (Case(q_lens=(129, 3, 64), prefixes=(0, 500, 63), group=8, head_dim=64, page_size=64,
                           pad_tokens=2), jnp.bfloat16, None),
    "g4_page_larger_than_block": (Case(q_lens=(260, 5, 64), prefixes=(300, 0, 128), group=4, head_dim=128,
                                       page_size=256, pad_tokens=3), jnp.bfloat16, None),
    # Many padding rows: the padding pseudo-sequence's positions reach -200 (and -130 with 64-key blocks).
    "g4_200_padding_rows": (Case(q_lens=(57, 9), prefixes=(1, 30), group=4, head_dim=128, page_size=16,
                                 pad_tokens=200), jnp.bfloat16, None),
    "g4_130_padding_rows_bkv64": (Case(q_lens=(57,), prefixes=(1,), group=4, head_dim=64, page_size=16,
                                       pad_tokens=130), jnp.bfloat16, pallas_mgpu.MosaicConfig(64, 3)),
    "g4_d64_bkv64_3stages_chunks_of_one_kv_head": (
        Case(q_lens=(1, 130, 77, 300), prefixes=(0, 64, 200, 17), group=4, head_dim=64, page_size=16,
             pad_tokens=5, num_kv_heads=4), jnp.bfloat16, pallas_mgpu.MosaicConfig(64, 3, head_chunk=1)),
    "g2_chunks_of_two_kv_heads": (Case(q_lens=(1, 130, 77, 300), prefixes=(0, 64, 200, 17), group=2,
                                       head_dim=128, page_size=16, pad_tokens=5, num_kv_heads=4), jnp.bfloat16,
                                  pallas_mgpu.MosaicConfig(head_chunk=2)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("name", sorted(_GPU_CASES))
def test_gpu_matches_reference(name):
  case, dtype, config = _GPU_CASES[name]
  args = make_inputs(case, dtype, seed=len(name))
  sm_scale = case.head_dim ** -0.5
  got = flash_prefill(*args, sm_scale=sm_scale, implementation="mosaic", mosaic_config=config)
  want = _reference(*[a.astype(jnp.float32) if a.dtype == dtype else a for a in args], sm_scale=sm_scale)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  real = sum(case.q_lens)
  assert np.isfinite(got).all(), "NaN or inf leaked into the output"
  np.testing.assert_allclose(got[:real], want[:real], rtol=2e-2, atol=2e-2)
  assert not got[real:].any()


@pytest.mark.gpu
@pytest.mark.skipif(not on_hopper(), reason="needs an sm_90 GPU")
def test_gpu_sequences_without_keys_give_zeros():
  """kv_len 0 (how the mixed-batch path hides decode rows from this kernel) writes zeros, not NaN."""
  case = Case(q_lens=(1, 130, 1, 40), prefixes=(0, 64, 9, 17), group=4, head_dim=128, page_size=16)
  q, k, v, kv_lens, page_table, cu, num = make_inputs(case, jnp.bfloat16, seed=5)
  want = np.asarray(_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), kv_lens,
                               page_table, cu, num, sm_scale=0.1), np.float32)
  hidden = kv_lens.at[jnp.asarray([0, 2])].set(0)
  got = np.asarray(flash_prefill(q, k, v, hidden, page_table, cu, num, sm_scale=0.1, implementation="mosaic"),
                   np.float32)
  rows = np.asarray(cu)
  assert not got[rows[0]].any() and not got[rows[2]].any()
  keep = np.ones(sum(case.q_lens), bool)
  keep[[rows[0], rows[2]]] = False
  np.testing.assert_allclose(got[:len(keep)][keep], want[:len(keep)][keep], rtol=2e-2, atol=2e-2)
