"""Tests of the paged decode kernel (Pallas interpreter on CPU) against the `jnp` reference.

Every test draws fresh random inputs: pages are shuffled, every slot no sequence owns (unused pages,
slots past kv_len) is NaN (or a NaN scale for quantized pages), and lengths are ragged, so an
out-of-bounds read or a leak of masked values fails the comparison. Sizes are tiny: the interpreter
compiles one program per shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.paged_decode import dequantize_kv, paged_decode, quantize_kv, ragged_decode, storage_dtype
from pallas_kernels.paged_decode.common import choose_num_splits, combine_splits

_ON_GPU = jax.devices()[0].platform == "gpu"
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  group: int
  q_len: int
  page_size: int
  kv_lens: tuple[int, ...]
  max_pages: int  # page-table width
  num_splits: int | None
  pages_per_block: int | None = None
  num_kv_heads: int = 2
  head_dim: int = 16


def _inputs(rng: np.random.Generator, c: Case, dtype):
  """Random q, shuffled NaN-poisoned pages, page table."""
  num_seqs = len(c.kv_lens)
  num_pages = num_seqs * c.max_pages + 3  # a few pages nobody owns
  shape = (c.num_kv_heads, num_pages, c.page_size, c.head_dim)
  k = np.full(shape, np.nan, np.float32)
  v = np.full(shape, np.nan, np.float32)
  perm = rng.permutation(num_pages)
  table = perm[:num_seqs * c.max_pages].reshape(num_seqs, c.max_pages).copy()
  for s, n in enumerate(c.kv_lens):
    n = max(n, c.q_len) if n else 0
    for t in range(n):
      page, slot = table[s, t // c.page_size], t % c.page_size
      k[:, page, slot] = rng.standard_normal((c.num_kv_heads, c.head_dim))
      v[:, page, slot] = rng.standard_normal((c.num_kv_heads, c.head_dim))
    # Entries past the last page may hold anything in range, e.g. another sequence's page.
    used = -(-n // c.page_size)
    table[s, used:] = rng.integers(0, num_pages, c.max_pages - used)
  q = rng.standard_normal((num_seqs, c.q_len, c.num_kv_heads * c.group, c.head_dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k), jnp.asarray(v),
          jnp.asarray(c.kv_lens, jnp.int32), jnp.asarray(table, jnp.int32))


def _assert_close(out, ref, tol: float):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


def _run(case: Case, q, k, v, kv_lens, table, **kw):
  return paged_decode(q, k, v, kv_lens, table, sm_scale=case.head_dim**-0.5,
                      num_splits=case.num_splits, pages_per_block=case.pages_per_block,
                      interpret=True, **kw)


_jit_reference = jax.jit(reference.paged_decode_attention, static_argnames=("sm_scale", "sliding_window"))


def _reference(case: Case, q, k, v, kv_lens, table, **kw):
  with jax.default_matmul_precision("highest"):
    return _jit_reference(q, k, v, kv_lens, table, sm_scale=case.head_dim**-0.5, **kw)


_CASES = [
    # (dtype, case): splits past a sequence's end see no keys; lengths 1, partial and full pages; a
    # padding sequence (kv_len 0).
    (jnp.float32, Case(group=1, q_len=1, page_size=4, kv_lens=(1, 6, 16, 0), max_pages=4,
                       num_splits=4, pages_per_block=2)),
    (jnp.float32, Case(group=4, q_len=3, page_size=8, kv_lens=(3, 21), max_pages=3, num_splits=3,
                       pages_per_block=1)),
    (jnp.float32, Case(group=8, q_len=5, page_size=4, kv_lens=(2, 9, 27), max_pages=7, num_splits=2,
                       pages_per_block=2)),
    (jnp.bfloat16, Case(group=4, q_len=2, page_size=8, kv_lens=(13, 1), max_pages=5, num_splits=None)),
    (jnp.bfloat16, Case(group=8, q_len=4, page_size=16, kv_lens=(40, 17, 5), max_pages=3,
                        num_splits=2, pages_per_block=1, num_kv_heads=1)),
    # One split: the kernel writes the normalized rows itself (8 of 16 rows real, a padding sequence).
    (jnp.float32, Case(group=4, q_len=2, page_size=4, kv_lens=(7, 0, 13), max_pages=4, num_splits=1,
                       pages_per_block=2)),
]


@pytest.mark.parametrize("dtype,case", _CASES, ids=lambda x: getattr(x, "__name__", None) or "")
def test_matches_reference(dtype, case):
  rng = np.random.default_rng()
  q, k, v, kv_lens, table = _inputs(rng, case, jnp.float32)
  q = q.astype(dtype)
  k, v = k.astype(dtype), v.astype(dtype)
  out = _run(case, q, k, v, kv_lens, table)
  assert out.shape == q.shape and out.dtype == q.dtype
  _assert_close(out, _reference(case, q, k, v, kv_lens, table), _TOL[dtype])


_QUANT_CASES = [
    ("int8", "token", Case(group=4, q_len=1, page_size=8, kv_lens=(19, 1, 8), max_pages=3,
                           num_splits=2, pages_per_block=1)),
    ("fp8", "token", Case(group=1, q_len=2, page_size=4, kv_lens=(11, 3), max_pages=4, num_splits=3,
                          pages_per_block=2)),
    ("fp8", "head", Case(group=8, q_len=1, page_size=8, kv_lens=(20, 9), max_pages=3, num_splits=2)),
    ("int8", "head", Case(group=2, q_len=3, page_size=8, kv_lens=(9, 17), max_pages=3, num_splits=1,
                          pages_per_block=1)),
]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(pages, kind, granularity):
  """Quantizes pages; NaN (unused) slots become 0 values with NaN scales (still poisoned)."""
  finite = jnp.where(jnp.isnan(pages), 0.0, pages)
  values, scales = quantize_kv(finite, kind, granularity, head_axis=0)
  if granularity == "token":
    scales = jnp.where(jnp.isnan(pages[..., 0]), jnp.nan, scales)
  return values, scales


@pytest.mark.parametrize("kind,granularity,case", _QUANT_CASES, ids=lambda x: x if isinstance(x, str) else "")
def test_quantized_matches_reference(kind, granularity, case):
  rng = np.random.default_rng()
  q, k, v, kv_lens, table = _inputs(rng, case, jnp.bfloat16)
  kq, ks = _quantize(k, kind, granularity)
  vq, vs = _quantize(v, kind, granularity)
  assert kq.dtype == storage_dtype(kind)
  out = _run(case, q, kq, vq, kv_lens, table, k_scales=ks, v_scales=vs)
  # Same quantized inputs: only the kernel's bf16 probabilities differ from the reference.
  _assert_close(out, _reference(case, q, kq, vq, kv_lens, table, k_scales=ks, v_scales=vs), 2e-2)
  # Against unquantized bf16 pages: the quantization error itself, measured as a relative norm.
  ref = np.asarray(_reference(case, q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), kv_lens, table),
                   np.float32)
  err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert err < (2e-2 if kind == "int8" else 6e-2), err


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["token", "head"])
def test_quantize_round_trip(kind, granularity):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((7, 3, 32)) * rng.uniform(0.1, 10, (7, 3, 1)), jnp.float32)
  values, scales = quantize_kv(x, kind, granularity)
  assert values.dtype == storage_dtype(kind)
  assert scales.shape == ((7, 3) if granularity == "token" else (3,))
  back = dequantize_kv(values, scales)
  # int8: half a step of amax / 127; e4m3: 3 mantissa bits, relative error <= 2**-4.
  amax = jnp.max(jnp.abs(x), axis=-1 if granularity == "token" else (0, 2), keepdims=True)
  if granularity == "head":
    amax = jnp.broadcast_to(amax, x.shape[:-1] + (1,))
  if kind == "int8":
    assert np.all(np.abs(back - x) <= 0.5 / 127 * amax + 1e-6)
  else:
    assert np.all(np.abs(back - x) <= 2.0**-4 * np.abs(x) + amax * 2.0**-9 / 448 * 8 + 1e-6)
  fixed, fixed_scales = quantize_kv(x, kind, "head", scales=jnp.full((3,), 0.5))
  np.testing.assert_array_equal(fixed_scales, 0.5)
  with pytest.raises(ValueError, match="valid"):
    quantize_kv(x, "int4", granularity)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_tokens", [2, 3, 5])  # fewer rows than sequences, as many, padding rows after
def test_ragged_decode_one_split_writes_rows_in_place(num_tokens):
  """The engine's decode path (`ragged_decode`) with one split, where the kernel writes the output rows itself:
  the same rows as with three splits and the reference, zeros for padding rows, in q's dtype."""
  case = Case(group=4, q_len=1, page_size=8, kv_lens=(12, 0, 30), max_pages=4, num_splits=1)
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(num_tokens), case, jnp.float32)
  q, k, v = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  rows = jnp.concatenate([q[:, 0], jnp.ones((2,) + q.shape[2:], q.dtype)])[:num_tokens]  # [T, H, D]
  run = functools.partial(ragged_decode, k_pages=k, v_pages=v, kv_lens=kv_lens, page_table=table,
                          sm_scale=case.head_dim**-0.5, pages_per_block=2, interpret=True)
  one, three = run(rows, num_splits=1), run(rows, num_splits=3)
  assert one.shape == rows.shape and one.dtype == jnp.bfloat16
  want = _reference(case, q, k, v, kv_lens, table)[:, 0]
  real = min(num_tokens, 3)
  _assert_close(one[:real], want[:real], _TOL[jnp.bfloat16])
  np.testing.assert_allclose(np.asarray(one, np.float32), np.asarray(three, np.float32), atol=1e-2)
  assert not np.asarray(one[3:], np.float32).any() and not np.asarray(one[1], np.float32).any()


def test_unsupported_inputs_raise_not_implemented():
  case = Case(group=2, q_len=1, page_size=4, kv_lens=(5,), max_pages=2, num_splits=1)
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(), case, jnp.float32)
  with pytest.raises(NotImplementedError):
    _run(case, q, k, v, kv_lens, table, sliding_window=4)


def test_num_splits_fills_the_chip():
  assert choose_num_splits(1, 8, max_blocks=256, num_sms=132) == 66  # 528 programs for one sequence
  assert choose_num_splits(8, 8, max_blocks=256, num_sms=132) == 8  # rounded down: no partial last wave
  assert choose_num_splits(64, 8, max_blocks=32, num_sms=132) == 1
  assert choose_num_splits(1, 8, max_blocks=4, num_sms=132) == 4  # every split gets a block


def test_combine_of_one_split_is_the_combine_with_an_empty_split():
  """One split takes a shortcut (no weighting); it must agree with the general merge, a sequence with no key
  (m = -inf, l = 0, acc = 0) giving zeros."""
  rng = np.random.default_rng(0)
  seqs, heads, rows, dim = 3, 2, 8, 16  # Q * G = 6 of 8 partial rows
  acc = jnp.asarray(rng.normal(size=(seqs, heads, 1, rows, dim)), jnp.float32).at[1].set(0.0)
  m = jnp.asarray(rng.normal(size=(seqs, heads, 1, rows)), jnp.float32).at[1].set(-jnp.inf)
  l = jnp.asarray(rng.uniform(1, 2, size=(seqs, heads, 1, rows)), jnp.float32).at[1].set(0.0)
  empty = lambda x, fill: jnp.concatenate([x, jnp.full_like(x, fill)], axis=2)
  one = combine_splits(acc, m, l, q_len=2, group=3)
  two = combine_splits(empty(acc, 0.0), empty(m, -jnp.inf), empty(l, 0.0), q_len=2, group=3)
  np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-6)
  assert one.shape == (seqs, 2, heads * 3, dim) and not np.asarray(one[1]).any()


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("kind,granularity", [(None, None), ("int8", "token"), ("fp8", "token"),
                                               ("fp8", "head"), ("int8", "head")])
def test_gpu_matches_reference(kind, granularity):
  # A page-table width that is neither a power of two nor a multiple of the block.
  case = Case(group=4, q_len=2, page_size=16, kv_lens=(1, 300, 790, 17), max_pages=50, num_splits=None,
              num_kv_heads=2, head_dim=128)
  q, k, v, kv_lens, table = _inputs(np.random.default_rng(), case, jnp.bfloat16)
  kw = {}
  if kind is not None:
    k, kw["k_scales"] = _quantize(k, kind, granularity)
    v, kw["v_scales"] = _quantize(v, kind, granularity)
  else:
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  out = paged_decode(q, k, v, kv_lens, table, sm_scale=case.head_dim**-0.5, **kw)
  _assert_close(out, _reference(case, q, k, v, kv_lens, table, **kw), 2e-2)
