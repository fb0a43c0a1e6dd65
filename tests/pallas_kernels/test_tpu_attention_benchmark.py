"""The parts of the TPU attention benchmark (`pdopt.benchmark.tpu_attention`) that need no TPU: the layout it
gives JAX's TPU kernel, the reference rows it checks outputs against, and the rooflines it reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as jax_rpa

from pallas_kernels import reference
from pdopt.benchmark import tpu_attention as bench

_SMALL = bench.Workload("small", q_lens=(3, 1, 130), prefixes=(5, 70, 2))


def test_jax_rpa_layout_holds_the_same_keys_and_values():
  # JAX's own jnp reference of its TPU kernel, on our pages in its layout, gives our reference's output.
  q, k, v, kv_lens, table, cu_q_lens, num_seqs = bench.make_inputs(_SMALL)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  sm_scale = bench.HEAD_DIM ** -0.5
  theirs = jax_rpa.ref_ragged_paged_attention(q, bench.to_jax_rpa_layout(k, v), kv_lens, table, cu_q_lens, num_seqs,
                                              sm_scale=sm_scale)
  with jax.default_matmul_precision("highest"):
    ours = reference.ragged_paged_attention(q, k, v, kv_lens, table, cu_q_lens, num_seqs, sm_scale=sm_scale)
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-4, atol=1e-4)


def test_reference_rows_slice_by_slice_is_the_reference():
  args = bench.make_inputs(_SMALL)
  sm_scale = bench.HEAD_DIM ** -0.5
  got = bench.reference_rows(args, 3, sm_scale, rows_per_call=32)  # the 130-row chunk in 5 slices
  with jax.default_matmul_precision("highest"):
    want = np.asarray(reference.ragged_paged_attention(*args, sm_scale=sm_scale), np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expected_rooflines():
  rows = bench.expected_rooflines()
  assert {r["chip"] for r in rows} == {"v5e", "v6e", "v7"}
  for r in rows:
    assert r["bound"] == ("memory" if r["workload"].startswith(("decode", "mixed")) else "compute"), r
  floor = {(r["chip"], r["workload"], r["kv"]): r["floor_us"] for r in rows}
  # Decodes read K/V once: int8 pages with float32 scales take (128 + 4) / 256 of the bf16 bytes.
  ratio = floor["v6e", "decode_b64_l4096", "int8"] / floor["v6e", "decode_b64_l4096", "bf16"]
  assert abs(ratio - 132 / 256) < 0.01, ratio
  # v5e's 820 GB/s: B=64 x 4096 keys x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 1.07 GB in 1.31 ms.
  assert abs(floor["v5e", "decode_b64_l4096", "bf16"] - 1310) < 5


def test_bench_workload_runs_in_tpu_interpret_mode(monkeypatch):
  """The benchmark's code path on CPU: in TPU interpret mode, with a stub timer, every implementation gives a
  row and ours matches the reference. JAX's TPU kernel cannot run here (it looks its block sizes up by TPU
  generation, and reshapes a ref, which TPU interpret mode does not support): its row records the error."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel

  from pallas_kernels import api  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(bench.timing, "time_jax_per_call", lambda fn, **_: 1e-3)
  chip = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion.TPU_V6E, 1)
  with api.tpu_interpret_mode():
    rows = {r["impl"]: r for r in bench.bench_workload(_SMALL, chip=chip, quick=True)}
  assert {"ours", "ours_int8", "jax_rpa", "xla"} <= set(rows)
  assert rows["ours"]["rel_err"] < 1e-2 and rows["ours_int8"]["rel_err"] < 3e-2, rows
  assert rows["ours"]["us"] == 1000 and rows["xla"]["rel_err"] < 1e-2
  assert "error" in rows["jax_rpa"] or rows["jax_rpa"]["rel_err"] < 1e-2
