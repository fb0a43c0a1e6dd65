"""`layers.einsum`: what the dots ask XLA for (the result dtype decides which GPU kernels XLA picks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdopt.models.layers import einsum


def _dot(a, b, out_dtype):
  """(preferred element type, precision) of the one dot_general in einsum's program."""
  jaxpr = jax.make_jaxpr(lambda x, y: einsum("TE,EF->TF", x, y, out_dtype=out_dtype))(a, b)
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  return jnp.dtype(eqn.params["preferred_element_type"]), eqn.params["precision"]


@pytest.mark.parametrize("a_dtype,b_dtype,out_dtype,want_result,highest", [
    (jnp.bfloat16, jnp.bfloat16, None, jnp.bfloat16, False),  # 16-bit in, 16-bit out: asked in 16 bits
    (jnp.float16, jnp.float16, None, jnp.float16, False),
    (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32, False),  # the logits
    (jnp.float32, jnp.float32, None, jnp.float32, True),
    (jnp.bfloat16, jnp.float32, None, jnp.float32, True),  # promoted to float32: HIGHEST, rounded after
])
def test_result_dtype_and_precision(a_dtype, b_dtype, out_dtype, want_result, highest):
  a, b = jnp.ones((4, 8), a_dtype), jnp.ones((8, 3), b_dtype)
  result, precision = _dot(a, b, out_dtype)
  assert result == jnp.dtype(want_result)
  assert (precision == (jax.lax.Precision.HIGHEST,) * 2) == highest, precision
  assert einsum("TE,EF->TF", a, b, out_dtype=out_dtype).dtype == jnp.dtype(out_dtype or a_dtype)


def test_bf16_values_are_float32_accumulation_rounded_once():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(16, 512)), jnp.bfloat16)
  b = jnp.asarray(rng.normal(size=(512, 8)), jnp.bfloat16)
  want = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
  got = np.asarray(einsum("TE,EF->TF", a, b), np.float32)
  # Within half a bfloat16 ulp (<= 2^-8 relative) of the float32 sum: one rounding (accumulating in bfloat16
  # would be off by hundreds of ulps here).
  np.testing.assert_array_less(np.abs(got - want), np.abs(want) * 2.0 ** -8 * (1 + 1e-3) + 1e-6)
