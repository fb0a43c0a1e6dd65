"""Speculative decoding's device programs (for `ModelRunner.call`): the target's verification and the draft
model's pass. Each comes in a greedy variant (argmax only: no sort, softmax or random draw) and a sampled
one, used when some request of the step samples; one compile per shape bucket and variant."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pdopt.engine import sampler
from pdopt.engine.batch import StepBatch, VerifyInputs
from pdopt.engine.speculative.acceptance import DRAFT_STREAM, greedy_accept, rejection_sample
from pdopt.models.layers import AttentionMetadata


def _device_guesses(verify: VerifyInputs) -> tuple[jax.Array, jax.Array | None]:
  """The draft's guesses for the target's sequence slots, from the draft pass's outputs (`guess_tokens`
  [S', K], `guess_probs` [S', K, V] when sampling) through `draft_rows` [S] (-1: no guesses)."""
  rows = verify.draft_rows
  k = verify.guess_tokens.shape[1]
  valid = (rows[:, None] >= 0) & (jnp.arange(k)[None, :] < verify.num_drafts[:, None])
  tokens = jnp.where(valid, verify.guess_tokens[jnp.maximum(rows, 0)], 0)
  probs = verify.guess_probs[jnp.maximum(rows, 0)] if verify.guess_probs is not None else None
  return tokens, probs


@functools.cache
def verify_program(sampled: bool):
  """The target's verification step: logits at the last 1 + num_drafts positions of every sequence, then
  the acceptance rule (`rejection_sample`, or `greedy_accept` when no sequence samples). The guesses come
  either from the host (`VerifyInputs.draft_tokens`) or, from the draft model, on the device
  (`_device_guesses`), written here into their token rows (the host packed placeholders there).
  Returns ((accepted [S], final [S], draft_tokens [S, K]), cache)."""
  def program(model, cache, batch: StepBatch, attention_backend: str):
    verify = batch.verify
    token_ids, num_drafts = batch.token_ids, verify.num_drafts
    last = batch.cu_q_lens[1:] - 1  # [S] row of each sequence's last token
    if verify.guess_tokens is not None:
      draft_tokens, draft_probs = _device_guesses(verify)
      # Guess j of sequence s sits at row last - num_drafts + 1 + j; rows past the guesses are dropped.
      g = jnp.arange(draft_tokens.shape[1])[None, :]
      at = jnp.where(g < num_drafts[:, None], (last - num_drafts + 1)[:, None] + g, token_ids.shape[0])
      token_ids = token_ids.at[at.reshape(-1)].set(draft_tokens.reshape(-1), mode="drop")
    else:
      draft_tokens, draft_probs = verify.draft_tokens, None
    s, k = draft_tokens.shape
    j = jnp.arange(k + 1)[None, :]
    rows = jnp.clip((last - num_drafts)[:, None] + j, 0, jnp.maximum(last, 0)[:, None])  # [S, K+1]
    logits, cache = model(token_ids, batch.metadata(), cache, logits_indices=rows.reshape(-1),
                          attention_backend=attention_backend)
    logits = logits.reshape(s, k + 1, -1)
    if sampled:
      p = batch.sampling
      accepted, final = rejection_sample(logits, draft_tokens, num_drafts, draft_probs, p.temperature, p.top_k,
                                         p.top_p, p.seeds, p.token_index)
    else:
      accepted, final = greedy_accept(logits, draft_tokens, num_drafts)
    return (accepted, final, draft_tokens), cache

  program.__name__ = program.__qualname__ = f"_verify_{'sampled' if sampled else 'greedy'}"
  return program


def _guesses(logits, batch: StepBatch, offset: int, sampled: bool):
  """One guess per sequence from draft logits [S, V] (token `token_index + offset` of each request) and,
  when some sequence samples, the (filtered) distribution it was drawn from (one-hot for greedy rows)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not sampled:
    return greedy, None
  p = batch.sampling
  masked = sampler.filter_logits(logits, p.temperature, p.top_k, p.top_p)
  keys = sampler.request_keys(p.seeds, p.token_index + offset, DRAFT_STREAM)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  rows = p.temperature > 0
  tokens = jnp.where(rows, drawn, greedy)
  probs = jnp.where(rows[:, None], jax.nn.softmax(masked, axis=-1),
                    jax.nn.one_hot(greedy, logits.shape[-1], dtype=jnp.float32))
  return tokens, probs


@functools.cache
def draft_program(num_steps: int, sampled: bool):
  """The draft's pass for k = `num_steps` guesses per sequence, as one device program.

  The program runs the packed chunks (each sequence's tokens the draft has not seen), guesses one token
  after every chunk, then feeds each sequence its latest guess for `draft.draft_steps[s] - 1` more one-token
  forwards (no host round trip between them); sequence s keeps its first `draft_steps[s]` guesses (0: it only
  catches up this pass). Rows past their count write nothing to the cache. Returns ((guess_tokens [S, k],
  guess_probs [S, k, V] or None), cache).
  """
  def program(model, cache, batch: StepBatch, attention_backend: str):
    logits, cache = model(batch.token_ids, batch.metadata(), cache, logits_indices=batch.logits_indices,
                          attention_backend=attention_backend)
    tokens, probs = _guesses(logits, batch, 0, sampled)
    out_tokens, out_probs = [tokens], [probs]
    page_table, steps = batch.page_table, batch.draft.draft_steps
    page_size = cache[0][0].shape[2]
    s = steps.shape[0]
    rows = jnp.arange(s)
    cu_q_lens = jnp.minimum(jnp.arange(s + 1), batch.num_seqs[0]).astype(jnp.int32)  # One token per sequence.
    end = batch.kv_lens  # Tokens in the cache after the chunks.
    for j in range(1, num_steps):
      live = j < steps
      pos = jnp.maximum(end + j - 1, 0)
      page = page_table[rows, jnp.minimum(pos // page_size, page_table.shape[1] - 1)]
      meta = AttentionMetadata(positions=pos, slot_mapping=jnp.where(live, page * page_size + pos % page_size, -1),
                               cu_q_lens=cu_q_lens, kv_lens=jnp.where(live, end + j, end), page_table=page_table,
                               num_seqs=batch.num_seqs, decode_only=True)
      logits, cache = model(tokens, meta, cache, logits_indices=rows, attention_backend=attention_backend)
      tokens, probs = _guesses(logits, batch, j, sampled)
      out_tokens.append(tokens)
      out_probs.append(probs)
    return (jnp.stack(out_tokens, axis=1), jnp.stack(out_probs, axis=1) if sampled else None), cache

  program.__name__ = program.__qualname__ = f"_draft_k{num_steps}_{'sampled' if sampled else 'greedy'}"
  return program
