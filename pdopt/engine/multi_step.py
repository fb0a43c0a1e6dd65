"""Decode steps chained on the device (`EngineConfig.async_decode`), several per program with
`EngineConfig.num_scheduler_steps`.

In steady decoding the host's work per step (asking the policy, packing, the transfer, launching a couple
hundred kernels, reading the tokens and the bookkeeping) can take longer than the step itself, and then
the device waits for the host however well the two overlap. This program takes its first input tokens
from the previous program's output on the device, so it can be dispatched before those tokens are read,
and runs `num_steps` decode steps per dispatch, so that work is paid once per `num_steps` tokens (vLLM's
multi-step scheduling):

- the packed batch is a decode-only step (sequence s's token in row s); row r with `prev_rows[r] >= 0`
  takes `prev_tokens[prev_rows[r]]`, the token an earlier program sampled for it;
- step i feeds each sequence the token step i - 1 sampled, at position + i, writing its K/V into the slot
  the page table gives for that position (the engine allocates the pages of all steps before dispatching)
  and attending over kv_len + i keys;
- sampled requests draw step i's token with `token_index + i`, so the tokens are the ones one-step
  decoding would draw.

The program returns the tokens of every step, `[num_steps, S]`, and the last step's on their own (the
next program's `prev_tokens`, without a slice on the host).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pdopt.engine import runner as runner_lib
from pdopt.engine import sampler
from pdopt.models.layers import AttentionMetadata


@functools.cache
def multi_step_impl(num_steps: int, sampled: bool):
  """The step function (for `ModelRunner.call`) of `num_steps` decode steps; `sampled`: some request
  samples (otherwise the greedy variant skips the sampler). Returns ({"tokens": [num_steps, S] int32,
  "last": [S] int32}, cache)."""
  def impl(static, attention_backend, state, cache, batch):
    model = runner_lib.merge(static, state)
    page_size = cache[0][0].shape[2]
    page_table, kv_lens = batch["page_table"], batch["kv_lens"]
    num_tokens, num_seqs = batch["token_ids"].shape[0], kv_lens.shape[0]
    rows = jnp.arange(num_tokens)
    seq = jnp.minimum(rows, num_seqs - 1)  # Row r is sequence r's token (decode-only layout).
    real = batch["slot_mapping"] >= 0  # Rows of padding write nothing, at every step.
    token_ids = batch["token_ids"]
    if "prev_tokens" in batch:
      prev_rows = batch["prev_rows"]
      token_ids = jnp.where(prev_rows >= 0, batch["prev_tokens"][jnp.maximum(prev_rows, 0)], token_ids)
    outputs = []
    for i in range(num_steps):
      pos = batch["positions"] + i
      page = page_table[seq, jnp.minimum(pos // page_size, page_table.shape[1] - 1)]
      meta = AttentionMetadata(positions=pos, slot_mapping=jnp.where(real, page * page_size + pos % page_size, -1),
                               cu_q_lens=batch["cu_q_lens"], kv_lens=jnp.where(kv_lens > 0, kv_lens + i, 0),
                               page_table=page_table, num_seqs=batch["num_seqs"], decode_only=True)
      logits, cache = model(token_ids, meta, cache, logits_indices=batch["logits_indices"],
                            attention_backend=attention_backend)
      if sampled:
        tokens = sampler.sample(logits, batch["temperature"], batch["top_k"], batch["top_p"], batch["seeds"],
                                batch["token_index"] + i)
      else:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      outputs.append(tokens)
      token_ids = jnp.where(rows < num_seqs, tokens[seq], 0)
    return {"tokens": jnp.stack(outputs), "last": outputs[-1]}, cache

  impl.__name__ = impl.__qualname__ = f"_multi_step_impl_{num_steps}_{'sampled' if sampled else 'greedy'}"
  return impl
