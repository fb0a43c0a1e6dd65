"""Tests of the fused norm + q/k/v + RoPE + KV write kernels (Pallas interpreter on CPU; the real backend on a
GPU) against their reference, `pallas_kernels.reference.norm_qkv_rope_write` (float32, HIGHEST precision).

Pages start with random contents (one page NaN), so a write to a wrong slot or head, or a cache whose
aliasing was lost, differs from the reference; some tokens are padding (slot -1) and must write nothing.
Row counts not a multiple of the row block test the masked rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.fused_layer import FusedConfig, default_config, norm_qkv_rope_write

_ON_GPU = jax.devices()[0].platform == "gpu"
_INTERPRET = not _ON_GPU
_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


@dataclasses.dataclass(frozen=True)
class Case:
  tokens: int
  group: int
  head_dim: int
  bias: bool = False
  splits: int = 2
  block_cols: int = 32
  block_rows: int = 16
  epilogue_rows: int = 16
  hidden: int = 64
  kv_heads: int = 2


def _qkv_inputs(rng, c: Case, dtype):
  num_pages, page_size = 6, 16
  x = jnp.asarray(rng.standard_normal((c.tokens, c.hidden)) * 3, dtype)
  norm_w = jnp.asarray(1 + 0.1 * rng.standard_normal(c.hidden), dtype)
  w = jnp.asarray(rng.standard_normal((c.hidden, c.kv_heads, c.group + 2, c.head_dim)) / np.sqrt(c.hidden), dtype)
  bias = jnp.asarray(rng.standard_normal((c.kv_heads, c.group + 2, c.head_dim)), dtype) if c.bias else None
  positions = jnp.asarray(rng.integers(0, 4000, c.tokens), jnp.int32)
  inv_freq = jnp.asarray(500000.0 ** (-np.arange(0, c.head_dim, 2) / c.head_dim), jnp.float32)  # RoPE, [D / 2]
  slots = rng.permutation(num_pages * page_size)[:c.tokens]
  slots[rng.random(c.tokens) < 0.25] = -1  # padding tokens
  # Finite old contents, so a kernel that lost the cache's aliasing (the interpreter fills outputs with NaN)
  # or wrote a wrong slot differs from the reference; one page is NaN and must stay so.
  shape = (c.kv_heads, num_pages, page_size, c.head_dim)
  cache = tuple(jnp.asarray(rng.standard_normal(shape), dtype).at[:, 5].set(jnp.nan) for _ in range(2))
  slots = np.where(slots // page_size == 5, -1, slots)
  return x, norm_w, w, bias, positions, inv_freq, jnp.asarray(slots, jnp.int32), cache


def _close(got, want, dtype, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern")
  ok = ~np.isnan(want)
  scale = max(1.0, float(np.abs(want[ok]).max())) if ok.any() else 1.0
  np.testing.assert_allclose(got[ok], want[ok], atol=_TOL[dtype] * scale, rtol=_TOL[dtype], err_msg=what)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", [
    Case(tokens=1, group=4, head_dim=32, splits=1),
    Case(tokens=5, group=1, head_dim=64, splits=4, block_cols=64),
    Case(tokens=20, group=2, head_dim=32, bias=True),  # two row blocks, the second masked
    Case(tokens=40, group=4, head_dim=32, block_rows=64, epilogue_rows=16),  # epilogue blocks smaller
    Case(tokens=3, group=8, head_dim=128, kv_heads=1, bias=True),
    Case(tokens=9, group=3, head_dim=16 * 2, kv_heads=3, splits=4, block_cols=16),
])
def test_norm_qkv_rope_write_matches_reference(case, dtype):
  rng = np.random.default_rng(hash(case) % 2**32)
  x, norm_w, w, bias, pos, freq, slots, cache = _qkv_inputs(rng, case, dtype)
  want_q, want_cache = reference.norm_qkv_rope_write(x, norm_w, w, bias, pos, freq, slots, cache, eps=1e-5)
  config = FusedConfig(block_k=16, block_rows=case.block_rows, block_cols=case.block_cols, splits=case.splits,
                       epilogue_rows=case.epilogue_rows)
  got_q, got_cache = norm_qkv_rope_write(x, norm_w, w, bias, pos, freq, slots, cache, eps=1e-5, config=config,
                                         interpret=_INTERPRET)
  assert got_q.shape == want_q.shape and got_q.dtype == want_q.dtype
  _close(got_q, want_q, dtype, "q")
  _close(got_cache[0], want_cache[0], dtype, "k pages")
  _close(got_cache[1], want_cache[1], dtype, "v pages")


def test_rejects_what_it_does_not_serve():
  rng = np.random.default_rng(0)
  case = Case(tokens=3, group=2, head_dim=32)
  x, norm_w, w, bias, pos, freq, slots, _ = _qkv_inputs(rng, case, jnp.float32)
  pages8, scales = jnp.zeros((2, 6, 16, 32), jnp.int8), jnp.ones((2, 6, 16), jnp.float32)
  quantized = (pages8, pages8, scales, scales)
  with pytest.raises(NotImplementedError, match="unquantized"):
    norm_qkv_rope_write(x, norm_w, w, bias, pos, freq, slots, quantized, eps=1e-5, interpret=True)
  cache = (jnp.zeros((2, 6, 16, 32), jnp.float32),) * 2
  with pytest.raises(NotImplementedError, match="in 3 splits"):  # 64 / 3
    norm_qkv_rope_write(x, norm_w, w, bias, pos, freq, slots, cache, eps=1e-5, config=FusedConfig(splits=3),
                        interpret=True)
  with pytest.raises(NotImplementedError, match="powers of two"):
    norm_qkv_rope_write(x, norm_w, w, bias, pos, freq, slots, cache, eps=1e-5, config=FusedConfig(block_rows=48),
                        interpret=True)
  with pytest.raises(NotImplementedError, match="like the weights"):
    norm_qkv_rope_write(x, norm_w, w.astype(jnp.bfloat16), bias, pos, freq, slots, cache, eps=1e-5, interpret=True)


def test_default_config_serves_the_default_shapes():
  for tokens in (1, 16, 17, 64, 256):
    config = default_config(tokens)
    assert 2048 % config.splits == 0 and config.block_cols >= 16
