"""Tests of the skinny matmuls with epilogues (`pallas_kernels.fused_mlp`: RMSNorm + gate/up + SiLU product, and
a projection with its residual add) against their references (float32, HIGHEST precision): the Pallas
interpreter on CPU, the real backend on a GPU. Row counts not a multiple of the row block test the masked
rows; several column and k blocks test the programs' offsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference
from pallas_kernels.fused_mlp import SkinnyConfig, matmul_add, norm_gate_up_silu
from cuda_lowering import lower_for_cuda

_ON_GPU = jax.devices()[0].platform == "gpu"
_INTERPRET = not _ON_GPU
_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def _close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, atol=_TOL[dtype] * scale, rtol=_TOL[dtype])


_CASES = [  # (tokens, E, F or N, config)
    (1, 64, 64, SkinnyConfig(block_rows=16, block_cols=16, block_k=16)),
    (5, 128, 96, SkinnyConfig(block_rows=16, block_cols=32, block_k=64)),  # 96: column blocks of 32
    (20, 64, 128, SkinnyConfig(block_rows=16, block_cols=64, block_k=32)),  # two row blocks, the second masked
    (40, 32, 64, SkinnyConfig(block_rows=64, block_cols=16, block_k=16)),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("tokens, hidden, width, config", _CASES)
def test_norm_gate_up_silu_matches_reference(tokens, hidden, width, config, dtype):
  rng = np.random.default_rng(tokens * 1000 + width)
  x = jnp.asarray(rng.standard_normal((tokens, hidden)) * 3, dtype)
  norm_w = jnp.asarray(1 + 0.1 * rng.standard_normal(hidden), dtype)
  w = jnp.asarray(rng.standard_normal((hidden, 2, width)) / np.sqrt(hidden), dtype)
  want = reference.norm_gate_up_silu(x, norm_w, w, eps=1e-5)
  got = norm_gate_up_silu(x, norm_w, w, eps=1e-5, config=config, interpret=_INTERPRET)
  assert got.shape == want.shape == (tokens, width) and got.dtype == want.dtype
  _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("tokens, k, n, config", _CASES)
def test_matmul_add_matches_reference(tokens, k, n, config, dtype):
  rng = np.random.default_rng(tokens * 1000 + n + 1)
  a = jnp.asarray(rng.standard_normal((tokens, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  residual = jnp.asarray(rng.standard_normal((tokens, n)) * 4, dtype)
  want = reference.matmul_add(a, w, residual)
  got = matmul_add(a, w, residual, config=config, interpret=_INTERPRET)
  assert got.shape == want.shape and got.dtype == want.dtype
  _close(got, want, dtype)


def test_rejects_what_it_does_not_serve():
  x, g = jnp.zeros((3, 64), jnp.float32), jnp.ones((64,), jnp.float32)
  with pytest.raises(NotImplementedError, match="like the weights"):
    norm_gate_up_silu(x, g, jnp.zeros((64, 2, 32), jnp.bfloat16), eps=1e-5, interpret=True)
  with pytest.raises(NotImplementedError, match=r"valid: \[T, E\], \[E\], \[E, 2, F\]"):
    norm_gate_up_silu(x, g, jnp.zeros((64, 3, 32), jnp.float32), eps=1e-5, interpret=True)
  with pytest.raises(NotImplementedError, match="F 24 has no power-of-two block"):
    norm_gate_up_silu(x, g, jnp.zeros((64, 2, 24), jnp.float32), eps=1e-5, interpret=True)
  with pytest.raises(NotImplementedError, match=r"valid: \[T, K\], \[K, N\], \[T, N\]"):
    matmul_add(x, jnp.zeros((32, 16), jnp.float32), jnp.zeros((3, 16), jnp.float32), interpret=True)
  with pytest.raises(NotImplementedError, match="block_rows=48"):
    matmul_add(x, jnp.zeros((64, 16), jnp.float32), jnp.zeros((3, 16), jnp.float32),
               config=SkinnyConfig(block_rows=48), interpret=True)


def test_lower_for_cuda():
  """Both kernels lower through Triton for CUDA at the Llama-3.2-1B shape (bfloat16, one token)."""
  x, g = jnp.zeros((1, 2048), jnp.bfloat16), jnp.ones((2048,), jnp.bfloat16)
  text = lower_for_cuda(lambda *a: norm_gate_up_silu(*a, eps=1e-5), (x, g, jnp.zeros((2048, 2, 8192), jnp.bfloat16)))
  assert "norm_gate_up_silu" in text
  text = lower_for_cuda(matmul_add, (jnp.zeros((1, 8192), jnp.bfloat16), jnp.zeros((8192, 2048), jnp.bfloat16), x))
  assert "matmul_add" in text
