"""Attention kernels on a device mesh: each device runs the kernel on its own shard of the heads.

A Pallas kernel is one custom call to XLA, which cannot split it: under jit with head-sharded operands, XLA
gathers every operand onto one device and runs the kernel there (for a KV cache, the whole pool of every layer
on every step). `per_device_heads` wraps a ragged paged attention kernel so that, when it is traced under a
mesh (`jax.set_mesh`) whose `HEAD_AXIS` splits the heads, it runs in `jax.shard_map`: q and the output split
on their query heads, the pages (and per-token or per-head scales) on their KV heads, the batch description
(lengths, page table) replicated. Each device sees K / n whole KV heads with their query heads, so GQA groups
never straddle devices. Other mesh axes (pdopt's `data`) replicate the call.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

# The mesh axis that splits attention heads: `pdopt.sharding.MODEL`, whose rules put "heads" and "kv_heads"
# there (a test keeps the two equal).
HEAD_AXIS = "model"


def head_shards() -> int:
  """How many ways the heads are split under the current mesh: the size of its HEAD_AXIS (1 with no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or HEAD_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[HEAD_AXIS]


def per_device_heads(kernel: Callable) -> Callable:
  """`kernel` (the signature of `pallas_kernels.reference.ragged_paged_attention`) run per device on its heads
  when the current mesh splits them, and as is otherwise.

  Args:
    kernel: the attention kernel.

  Returns:
    A function with the kernel's signature.
  """

  @functools.wraps(kernel)
  def run(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, k_scales=None, v_scales=None,
          **options):
    if head_shards() == 1:
      return kernel(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scales=k_scales,
                    v_scales=v_scales, **options)
    heads, kv_heads, replicated = P(None, HEAD_AXIS, None), P(HEAD_AXIS), P()
    scales = () if k_scales is None else (k_scales, v_scales)

    def local(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *scales):
      k_scales, v_scales = scales or (None, None)
      return kernel(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scales=k_scales,
                    v_scales=v_scales, **options)

    in_specs = (heads, kv_heads, kv_heads, replicated, replicated, replicated, replicated) + (kv_heads,) * len(scales)
    # check_vma=False: the kernel's pallas_call has no replication rule of its own.
    return jax.shard_map(local, in_specs=in_specs, out_specs=heads, check_vma=False)(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *scales)

  return run
