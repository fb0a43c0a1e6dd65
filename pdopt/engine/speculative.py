"""Speculative decoding inside the continuous-batching engine.

A proposer guesses up to k tokens for each running decode; the target model then runs the last real token
plus the k guesses of every such sequence in the step's one forward pass (a chunk of k+1 tokens in the
ragged batch, with logits at all k+1 positions), and accepts a prefix of the guesses by the rejection rule
of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Algorithm 1):

  guess x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the token is
  drawn from norm(max(0, p_j - q_j)) instead and the rest is dropped; if all guesses are accepted a bonus
  token is drawn from p_k.

p is the target's sampling distribution and q the proposer's, both after the request's temperature, top-k
and top-p filtering (`sampler.filter_logits`; the draft model samples from exactly the filtered q it
reports, so the output follows the target's filtered distribution exactly, filters included). At
temperature 0 the rule reduces to "accept while the guess equals the target's argmax, then emit the
argmax", so greedy output is token-identical to decoding without speculation.

Randomness stays per request and deterministic: token `i` of a request with seed `s` draws from
`fold_in(fold_in(PRNGKey(s), i), stream)` with one stream per purpose (draft sample, acceptance coin,
residual sample); the bonus token (and every token of a sequence that has no guesses this step) is drawn
exactly as the non-speculative sampler draws it, from `fold_in(PRNGKey(s), i)`.

Proposers (`SpeculativeMethod`):
  draft   a small model with the target's vocabulary and its own paged KV cache (own `BlockManager` and
          `ModelRunner`). Per step one device program (`draft_impl`) catches up on the tokens the draft
          has not seen (the whole prompt on a request's first decode, afterwards the last accepted guess
          and the corrected token) and runs the k-1 further one-token steps, batched over the speculating
          sequences; its guesses (and q rows) stay on the device and go straight into the verification, so
          a speculative step costs the host two dispatches and one wait. After verification the draft's
          KV is rolled back to the accepted prefix (`BlockManager.truncate`).
  ngram   prompt lookup (no model): the longest suffix n-gram (prompt_lookup_max down to
          prompt_lookup_min tokens) that occurred earlier in the sequence proposes what followed its most
          recent earlier occurrence; it may propose fewer than k tokens, or none.

How it fits the engine: the policies still schedule a decode as one token, so every policy works
unchanged. The engine then widens each decode chunk to 1 + d tokens (d <= k) where the step's token budget
(`max_num_batched_tokens`), the free pages and the request's remaining `max_tokens` allow, verifies, and
gives back the pages of rejected positions (`BlockManager.truncate`; their K/V in the target cache are
simply overwritten later). A step without any guesses runs the ordinary compiled step, so the
non-speculative shapes are unchanged. Verification and the draft pass are further jitted functions, each
in a greedy variant (argmax only: no sort, softmax or random draw) and a sampled one, used when some
request of the step samples; one compile per shape bucket and variant, with k fixed per engine.

Limitations: no mesh (tensor-parallel) support yet; the draft prefix is computed lazily at a request's
first decode rather than alongside the target's prefill.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdopt.cache.block_manager import BlockManager
from pdopt.engine import runner as runner_lib
from pdopt.engine import sampler
from pdopt.engine.batch import Buckets, ChunkSpec, pack
from pdopt.engine.request import Request
from pdopt.engine.runner import ModelRunner
from pdopt.models.layers import AttentionMetadata
from pdopt.models.transformer import Transformer

# PRNG streams folded into a request's per-token key (the plain sampler uses the key unfolded).
DRAFT_STREAM = 1
ACCEPT_STREAM = 2
RESIDUAL_STREAM = 3


class SpeculativeMethod(enum.Enum):
  """Where the guesses come from."""
  DRAFT = "draft"  # A small draft model (Engine(..., draft_model=...)).
  NGRAM = "ngram"  # Prompt lookup in the sequence's own tokens.


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """Speculative decoding settings (`EngineConfig.speculative`).

  Attributes:
    method: "draft" or "ngram" (a `SpeculativeMethod` or its value).
    num_speculative_tokens: k, the most guesses verified per sequence per step (>= 1).
    prompt_lookup_min, prompt_lookup_max: n-gram sizes (tokens) the `ngram` proposer tries, longest first.
  """
  method: SpeculativeMethod | str = SpeculativeMethod.DRAFT
  num_speculative_tokens: int = 4
  prompt_lookup_min: int = 1
  prompt_lookup_max: int = 4

  def __post_init__(self):
    try:
      object.__setattr__(self, "method", SpeculativeMethod(self.method))
    except ValueError:
      valid = ", ".join(m.value for m in SpeculativeMethod)
      raise ValueError(f"SpeculativeConfig.method: unknown method {self.method!r}; valid: {valid}") from None
    for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SpeculativeConfig.{name} must be an int >= 1, got {value!r}")
    if self.prompt_lookup_min > self.prompt_lookup_max:
      raise ValueError(f"SpeculativeConfig.prompt_lookup_min={self.prompt_lookup_min} exceeds "
                       f"prompt_lookup_max={self.prompt_lookup_max}")


@dataclasses.dataclass(frozen=True)
class SpecStats:
  """Counters of a speculating engine since it was built.

  Attributes:
    num_forwards: target forward passes (speculating or not).
    num_verify_forwards: of those, passes that verified at least one guess.
    num_generated_tokens: tokens the target passes produced (before any cut at a stop token).
    num_drafts: sequence-steps that verified at least one guess.
    num_draft_tokens: guesses verified.
    num_accepted_tokens: guesses accepted.
    propose_seconds: host wall time spent proposing (for the draft model: preparing and dispatching its
      program, which the host does not wait for; its device time shows in `target_seconds`).
    target_seconds: host wall time of the target passes (packing, dispatching, waiting for the results,
      the draft's program included, and reading them back).
  """
  num_forwards: int = 0
  num_verify_forwards: int = 0
  num_generated_tokens: int = 0
  num_drafts: int = 0
  num_draft_tokens: int = 0
  num_accepted_tokens: int = 0
  propose_seconds: float = 0.0
  target_seconds: float = 0.0

  @property
  def acceptance_rate(self) -> float:
    """Accepted guesses / verified guesses (0.0 before any)."""
    return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

  @property
  def mean_accepted_length(self) -> float:
    """Tokens a speculating sequence emits per verification: 1 + accepted guesses (vLLM's "mean
    acceptance length"; between 1 and k + 1; 0.0 before any)."""
    return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

  @property
  def tokens_per_forward(self) -> float:
    """Generated tokens per target forward pass (all sequences of the batch; at batch 1 the speed-up in
    forward passes over plain decoding)."""
    return self.num_generated_tokens / self.num_forwards if self.num_forwards else 0.0

  def as_dict(self) -> dict[str, float]:
    """The counters and the derived rates under `spec_`-prefixed names (metrics.json)."""
    out = {f"spec_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}
    out.update(spec_acceptance_rate=self.acceptance_rate, spec_mean_accepted_length=self.mean_accepted_length,
               spec_tokens_per_forward=self.tokens_per_forward)
    return out


# --------------------------------------------------------------------------------------- device functions


def rejection_sample(logits: jax.Array, draft_tokens: jax.Array, num_drafts: jax.Array,
                     draft_probs: jax.Array | None, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                     seeds: jax.Array, token_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Leviathan et al.'s acceptance rule for a batch of sequences.

  Args:
    logits: [S, K+1, V] float32 target logits; row j predicts the token after guess j-1 (row 0: after the
      last real token).
    draft_tokens: [S, K] int32 guesses; entries past `num_drafts` are padding.
    num_drafts: [S] int32 guesses per sequence (0: a plain step, the token comes from row 0).
    draft_probs: [S, K, V] float32 proposal distributions q, or None for deterministic proposals
      (q = one-hot of the guess, as for n-gram lookup).
    temperature, top_k, top_p: [S] the requests' sampling parameters (temperature 0: greedy).
    seeds: [S] uint32 per-request seeds.
    token_index: [S] int32 index (in the request's output) of the token row 0 predicts.

  Returns:
    (accepted [S] int32 in [0, num_drafts], final [S] int32): the sequence emits `draft_tokens[:accepted]`
    and then `final` (the corrected token after a rejection, else the bonus token).
  """
  s, k1, v = logits.shape
  k = k1 - 1
  rep = lambda x: jnp.repeat(x, k1)  # noqa: E731
  masked = sampler.filter_logits(logits.reshape(s * k1, v), rep(temperature), rep(top_k), rep(top_p))
  p = jax.nn.softmax(masked.reshape(s, k1, v), axis=-1)  # [S, K+1, V]
  q = draft_probs if draft_probs is not None else jax.nn.one_hot(draft_tokens, v, dtype=p.dtype)  # [S, K, V]
  greedy = temperature <= 0  # [S]
  j = jnp.arange(k)
  target_argmax = jnp.argmax(logits[:, :k], axis=-1)  # [S, K]
  px = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]  # [S, K]
  qx = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]  # [S, K]
  index = (token_index[:, None] + j[None, :]).reshape(-1)  # [S*K]
  coin_keys = sampler.request_keys(jnp.repeat(seeds, k), index, ACCEPT_STREAM)
  coins = jax.vmap(jax.random.uniform)(coin_keys).reshape(s, k)  # [S, K] in [0, 1)
  ok = jnp.where(greedy[:, None], draft_tokens == target_argmax, coins * qx < px)  # u < p/q, q(x) > 0
  ok &= j[None, :] < num_drafts[:, None]
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [S]
  at = accepted[:, None, None]
  logits_a = jnp.take_along_axis(logits, at, axis=1)[:, 0]  # [S, V]
  bonus = sampler.sample(logits_a, temperature, top_k, top_p, seeds, token_index + accepted)
  p_a = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [S, V]
  q_a = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1), at, axis=1)[:, 0]
  residual = jnp.maximum(p_a - q_a, 0.0)
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_a)
  keys = sampler.request_keys(seeds, token_index + accepted, RESIDUAL_STREAM)
  resampled = jax.vmap(jax.random.categorical)(keys, jnp.log(residual)).astype(jnp.int32)
  final = jnp.where((accepted < num_drafts) & ~greedy, resampled, bonus)
  return accepted.astype(jnp.int32), final


def greedy_accept(logits: jax.Array, draft_tokens: jax.Array, num_drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The acceptance rule when no sequence samples: guesses are accepted while they equal the target's
  argmax, and the argmax after the last accepted one is emitted. Same arguments and results as
  `rejection_sample` restricted to temperature 0 (no sort, softmax or random draw)."""
  k = draft_tokens.shape[1]
  target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S, K+1]
  ok = (draft_tokens == target[:, :k]) & (jnp.arange(k)[None, :] < num_drafts[:, None])
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)  # [S]
  return accepted, jnp.take_along_axis(target, accepted[:, None], axis=1)[:, 0]


def _device_guesses(batch) -> tuple[jax.Array, jax.Array | None]:
  """The draft's guesses for the target's sequence slots, from the draft pass's outputs (`guess_tokens`
  [S', K], `guess_probs` [S', K, V] when sampling) through `draft_rows` [S] (-1: no guesses)."""
  rows = batch["draft_rows"]
  k = batch["guess_tokens"].shape[1]
  valid = (rows[:, None] >= 0) & (jnp.arange(k)[None, :] < batch["num_drafts"][:, None])
  tokens = jnp.where(valid, batch["guess_tokens"][jnp.maximum(rows, 0)], 0)
  probs = batch["guess_probs"][jnp.maximum(rows, 0)] if "guess_probs" in batch else None
  return tokens, probs


@functools.cache
def verify_impl(sampled: bool):
  """The target's verification step: logits at the last 1 + num_drafts positions of every sequence, then
  the acceptance rule (`rejection_sample`, or `greedy_accept` when no sequence samples). The guesses come
  either from the host (`draft_tokens`, `draft_probs`) or, from the draft model, on the device
  (`_device_guesses`), written here into their token rows (the host packed placeholders there).
  Returns ((accepted [S], final [S], draft_tokens [S, K]), cache)."""
  def impl(static, attention_backend, state, cache, batch):
    return _verify(static, attention_backend, state, cache, batch, sampled=sampled)

  impl.__name__ = impl.__qualname__ = f"_verify_{'sampled' if sampled else 'greedy'}"
  return impl


def _verify(static, attention_backend, state, cache, batch, *, sampled: bool):
  model = runner_lib.merge(static, state)
  token_ids, num_drafts = batch["token_ids"], batch["num_drafts"]
  last = batch["cu_q_lens"][1:] - 1  # [S] row of each sequence's last token
  if "guess_tokens" in batch:
    draft_tokens, draft_probs = _device_guesses(batch)
    # Guess j of sequence s sits at row last - num_drafts + 1 + j; rows past the guesses are dropped.
    g = jnp.arange(draft_tokens.shape[1])[None, :]
    at = jnp.where(g < num_drafts[:, None], (last - num_drafts + 1)[:, None] + g, token_ids.shape[0])
    token_ids = token_ids.at[at.reshape(-1)].set(draft_tokens.reshape(-1), mode="drop")
  else:
    draft_tokens, draft_probs = batch["draft_tokens"], batch.get("draft_probs")
  s, k = draft_tokens.shape
  j = jnp.arange(k + 1)[None, :]
  rows = jnp.clip((last - num_drafts)[:, None] + j, 0, jnp.maximum(last, 0)[:, None])  # [S, K+1]
  logits, cache = model(token_ids, runner_lib.metadata(batch), cache, logits_indices=rows.reshape(-1),
                        attention_backend=attention_backend)
  logits = logits.reshape(s, k + 1, -1)
  if sampled:
    accepted, final = rejection_sample(logits, draft_tokens, num_drafts, draft_probs, batch["temperature"],
                                       batch["top_k"], batch["top_p"], batch["seeds"], batch["token_index"])
  else:
    accepted, final = greedy_accept(logits, draft_tokens, num_drafts)
  return (accepted, final, draft_tokens), cache


def _guesses(logits, batch, offset: int, sampled: bool):
  """One guess per sequence from draft logits [S, V] (token `token_index + offset` of each request) and,
  when some sequence samples, the (filtered) distribution it was drawn from (one-hot for greedy rows)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not sampled:
    return greedy, None
  temperature = batch["temperature"]
  masked = sampler.filter_logits(logits, temperature, batch["top_k"], batch["top_p"])
  keys = sampler.request_keys(batch["seeds"], batch["token_index"] + offset, DRAFT_STREAM)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  rows = temperature > 0
  tokens = jnp.where(rows, drawn, greedy)
  probs = jnp.where(rows[:, None], jax.nn.softmax(masked, axis=-1),
                    jax.nn.one_hot(greedy, logits.shape[-1], dtype=jnp.float32))
  return tokens, probs


@functools.cache
def draft_impl(num_steps: int, sampled: bool):
  """The draft's pass for k = `num_steps` guesses per sequence, as one device program.

  The returned step function runs the packed chunks (each sequence's tokens the draft has not seen),
  guesses one token after every chunk, then feeds each sequence its latest guess for `draft_steps[s] - 1`
  more one-token forwards (no host round trip between them); sequence s keeps its first `draft_steps[s]`
  guesses (0: it only catches up this pass). Rows past their count write nothing to the cache. Returns
  ({"guess_tokens": [S, k], and with `sampled` "guess_probs": [S, k, V]}, cache).
  """
  def impl(static, attention_backend, state, cache, batch):
    model = runner_lib.merge(static, state)
    logits, cache = model(batch["token_ids"], runner_lib.metadata(batch), cache, logits_indices=batch["logits_indices"],
                          attention_backend=attention_backend)
    tokens, probs = _guesses(logits, batch, 0, sampled)
    out_tokens, out_probs = [tokens], [probs]
    page_table, steps = batch["page_table"], batch["draft_steps"]
    page_size = cache[0][0].shape[2]
    s = steps.shape[0]
    rows = jnp.arange(s)
    num_seqs = batch["num_seqs"]
    cu_q_lens = jnp.minimum(jnp.arange(s + 1), num_seqs[0]).astype(jnp.int32)  # One token per real sequence.
    end = batch["kv_lens"]  # Tokens in the cache after the chunks.
    for j in range(1, num_steps):
      live = j < steps
      pos = jnp.maximum(end + j - 1, 0)
      page = page_table[rows, jnp.minimum(pos // page_size, page_table.shape[1] - 1)]
      meta = AttentionMetadata(positions=pos, slot_mapping=jnp.where(live, page * page_size + pos % page_size, -1),
                               cu_q_lens=cu_q_lens, kv_lens=jnp.where(live, end + j, end), page_table=page_table,
                               num_seqs=num_seqs, decode_only=True)
      logits, cache = model(tokens, meta, cache, logits_indices=rows, attention_backend=attention_backend)
      tokens, probs = _guesses(logits, batch, j, sampled)
      out_tokens.append(tokens)
      out_probs.append(probs)
    out = {"guess_tokens": jnp.stack(out_tokens, axis=1)}
    if sampled:
      out["guess_probs"] = jnp.stack(out_probs, axis=1)
    return out, cache

  impl.__name__ = impl.__qualname__ = f"_draft_impl_k{num_steps}_{'sampled' if sampled else 'greedy'}"
  return impl


# --------------------------------------------------------------------------------------------- proposers


@dataclasses.dataclass(frozen=True)
class Proposals:
  """Guesses for the sequences of a step.

  Attributes:
    counts: guesses per sequence (known on the host before the guesses themselves).
    token_ids: the guesses per sequence on the host (n-gram lookup), or None when they stay on the device.
    device: the draft pass's outputs on the device (`draft_impl`), or None; sequence i's guesses are row
      `rows[i]` of them.
    rows: per sequence, its row in `device` (-1: none).
  """
  counts: tuple[int, ...]
  token_ids: tuple[tuple[int, ...], ...] | None = None
  device: dict[str, jax.Array] | None = None
  rows: tuple[int, ...] = ()


class Proposer(Protocol):
  """Guesses continuations of running sequences. `propose` gets the step's requests (prompt plus generated
  tokens in `all_token_ids`) and the most guesses each may get (0: none)."""

  def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> Proposals:
    ...

  def rollback(self, request_id: str, num_tokens: int) -> None:
    """Only the first `num_tokens` tokens of the request are known to be right; forget the rest."""

  def free(self, request_id: str) -> None:
    """The request ended or was preempted."""

  def check_no_leaks(self, idle: bool) -> None:
    """Raises if the proposer's own state is inconsistent (or, when `idle`, not empty)."""

  def warmup_calls(self, shapes: Sequence[tuple[int, int, int]]) -> list[runner_lib.WarmupCall]:
    """The programs `propose` will run for these (T, S, P) buckets, for the engine's warm-up to compile."""


class NgramProposer:
  """Prompt lookup: continue the sequence the way it continued after the most recent earlier occurrence of
  its longest matching suffix n-gram (sizes `max_n` down to `min_n`)."""

  def __init__(self, min_n: int, max_n: int):
    self.min_n, self.max_n = min_n, max_n

  def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> Proposals:
    guesses = tuple(tuple(self.lookup(r.all_token_ids, d)) if d > 0 else () for r, d in zip(requests, max_drafts))
    return Proposals(counts=tuple(len(g) for g in guesses), token_ids=guesses)

  def lookup(self, token_ids: Sequence[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
    ids = np.asarray(token_ids, np.int64)
    for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
      windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # Starts before the suffix itself.
      hits = np.flatnonzero(np.all(windows == ids[-n:], axis=1))
      if hits.size:
        start = int(hits[-1]) + n
        return ids[start:start + k].tolist()
    return []

  def rollback(self, request_id: str, num_tokens: int) -> None:
    pass

  def free(self, request_id: str) -> None:
    pass

  def check_no_leaks(self, idle: bool) -> None:
    pass

  def warmup_calls(self, shapes: Sequence[tuple[int, int, int]]) -> list[runner_lib.WarmupCall]:
    return []


class DraftModelProposer:
  """A small draft model with its own paged KV cache.

  `self.computed[request_id]` tokens of each sequence (real tokens, then the guesses of the current step)
  have K/V in the draft's pages. One pass (`draft_impl`, one device program) runs every speculating
  sequence's missing tokens and all of its guesses; its outputs stay on the device and feed the target's
  verification directly, so the host never waits for the draft. Only when the missing tokens exceed one
  pass (a request's first decode after a long prompt) do catch-up passes run first (their outputs unused).
  """

  def __init__(self, model: Transformer, num_pages: int, page_size: int, buckets: Buckets, max_tokens: int,
               num_speculative_tokens: int, attention_backend: str = "auto"):
    """Args:
      model: the draft model (same vocabulary as the target).
      num_pages, page_size: its KV pool.
      buckets: shape buckets of its passes (the engine's).
      max_tokens: tokens per pass.
      num_speculative_tokens: k, the most guesses per sequence (one pass computes them all).
      attention_backend: see `pallas_kernels.api`.
    """
    self.block_manager = BlockManager(num_pages, page_size, enable_prefix_caching=False)
    self.runner = ModelRunner(model, num_pages, page_size, attention_backend)
    self.buckets = buckets
    self.page_size = page_size
    self.max_tokens = max_tokens
    self.max_seqs = buckets.seqs[-1]
    self.k = num_speculative_tokens
    self.computed: dict[str, int] = {}

  def _pass(self, requests, parts, num_slots: int, sampled: bool):
    """Dispatches one draft pass over `parts` = (request index, start, num tokens, guesses)."""
    chunks, steps = [], []
    for i, start, n, want in parts:
      req = requests[i]
      chunks.append(ChunkSpec(token_ids=req.all_token_ids[start:start + n], start=start,
                              page_table=self.block_manager.page_table(req.request_id),
                              temperature=float(req.sampling.temperature), top_k=req.sampling.top_k,
                              top_p=float(req.sampling.top_p), seed=req.seed, token_index=req.num_generated))
      steps.append(want)
      self.computed[req.request_id] = start + n + max(want - 1, 0)
    num_tokens = sum(len(c.token_ids) for c in chunks)
    # The pass takes the target step's sequence bucket, so its outputs index like the verification's.
    shape = self.buckets.pick(max(num_tokens, num_slots), max(len(chunks), num_slots),
                              max(len(c.page_table) for c in chunks))
    batch = pack(chunks, self.page_size, shape)
    batch["draft_steps"] = np.zeros(shape[1], np.int32)
    batch["draft_steps"][:len(steps)] = steps
    return self.runner.call(draft_impl(self.k, sampled), batch, fetch=False)

  def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> Proposals:
    counts = [0] * len(requests)
    todo = []  # (request index, tokens the draft has, guesses)
    for i, d in enumerate(max_drafts):
      if d <= 0:
        continue
      req = requests[i]
      want, end = d, req.num_tokens
      # Guess j > 0 writes guess j - 1's K/V: pages for end + want - 1 tokens.
      while want > 1 and not self.block_manager.allocate(req.request_id, end + want - 1):
        want -= 1
      if want == 1 and not self.block_manager.allocate(req.request_id, end):
        continue  # The draft pool is full: no guesses for this sequence this step.
      todo.append((i, self.computed.get(req.request_id, 0), want))
      counts[i] = want
    if not todo:
      return Proposals(counts=tuple(counts))
    sampled = _samples(requests)  # As the verification: its sampled program needs the draft's q.
    num_slots = len(requests)
    if sum(requests[i].num_tokens - start for i, start, _ in todo) > self.max_tokens:
      # Catch up on all but each sequence's last token first, in as many passes as the budget needs.
      parts, budget = [], self.max_tokens
      for i, start, _ in todo:
        left = requests[i].num_tokens - 1 - start
        while left > 0:
          if budget == 0 or len(parts) == self.max_seqs:
            self._pass(requests, parts, 1, sampled)
            parts, budget = [], self.max_tokens
          n = min(left, budget)
          parts.append((i, start, n, 0))
          start, left, budget = start + n, left - n, budget - n
      if parts:
        self._pass(requests, parts, 1, sampled)
      todo = [(i, requests[i].num_tokens - 1, want) for i, _, want in todo]
    out = self._pass(requests, [(i, start, requests[i].num_tokens - start, want) for i, start, want in todo],
                     num_slots, sampled)
    rows = [-1] * len(requests)
    for r, (i, _, _) in enumerate(todo):
      rows[i] = r
    return Proposals(counts=tuple(counts), device=out, rows=tuple(rows))

  def rollback(self, request_id: str, num_tokens: int) -> None:
    if request_id in self.computed and self.computed[request_id] > num_tokens:
      self.computed[request_id] = num_tokens
      self.block_manager.truncate(request_id, num_tokens)

  def free(self, request_id: str) -> None:
    self.computed.pop(request_id, None)
    self.block_manager.free(request_id)

  def check_no_leaks(self, idle: bool) -> None:
    self.block_manager.check_invariants()
    for rid, n in self.computed.items():
      if n > len(self.block_manager.page_table(rid)) * self.page_size:
        raise AssertionError(f"draft of {rid!r} claims {n} computed tokens beyond its pages")
    if idle:
      if self.computed:
        raise AssertionError(f"draft state of ended requests left: {sorted(self.computed)[:10]}")
      self.block_manager.assert_no_leaks()

  def warmup_calls(self, shapes: Sequence[tuple[int, int, int]]) -> list[runner_lib.WarmupCall]:
    calls = []
    for shape in shapes:
      batch = pack([], self.page_size, shape)
      batch["draft_steps"] = np.zeros(shape[1], np.int32)
      calls += [runner_lib.WarmupCall(self.runner, batch, impl=draft_impl(self.k, sampled))
                for sampled in (False, True)]
    return calls


# ------------------------------------------------------------------------------------------------ decoder


class SpeculativeDecoder:
  """Runs the engine's forward passes with speculation: proposes, verifies, rolls back.

  The engine keeps its bookkeeping (tokens, stop conditions, timestamps, prefix-cache commits); this
  class decides how far each decode chunk is widened, owns the proposer and counts `SpecStats`.
  """

  def __init__(self, config: SpeculativeConfig, target: Transformer, draft: Transformer | None,
               num_pages: int, page_size: int, buckets: Buckets, max_num_batched_tokens: int,
               max_model_len: int, attention_backend: str = "auto"):
    """Args:
      config: the speculative settings.
      target: the target model (for the vocabulary check).
      draft: the draft model, required for method "draft" and refused otherwise.
      num_pages, page_size: the target's KV pool (the draft gets a pool of the same size).
      buckets: the engine's shape buckets (the draft's passes use them too).
      max_num_batched_tokens: the step's token budget.
      max_model_len: longest sequence (tokens); the draft's context must hold it.
      attention_backend: see `pallas_kernels.api`.

    Raises:
      ValueError: a missing, superfluous or incompatible draft model, named.
    """
    self.config = config
    self.k = config.num_speculative_tokens
    self.page_size = page_size
    self.buckets = buckets
    self.stats = SpecStats()
    match config.method:
      case SpeculativeMethod.DRAFT:
        if draft is None:
          raise ValueError("EngineConfig.speculative.method='draft' needs a draft model: "
                           "pdopt.Engine(model, config, draft_model=...)")
        if draft.config.vocab_size != target.config.vocab_size:
          raise ValueError(f"draft_model vocab_size {draft.config.vocab_size} differs from the target's "
                           f"{target.config.vocab_size}")
        if draft.config.max_position_embeddings < max_model_len:
          raise ValueError(f"draft_model context {draft.config.max_position_embeddings} is shorter than "
                           f"max_model_len {max_model_len}")
        self.proposer: Proposer = DraftModelProposer(draft, num_pages, page_size, buckets,
                                                     max_num_batched_tokens, self.k, attention_backend)
      case SpeculativeMethod.NGRAM:
        if draft is not None:
          raise ValueError("draft_model is only used by EngineConfig.speculative.method='draft', got "
                           f"method={config.method.value!r}")
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)

  def _count(self, **increments: float) -> None:
    self.stats = dataclasses.replace(self.stats, **{k: getattr(self.stats, k) + v for k, v in increments.items()})

  def execute(self, runner: ModelRunner, block_manager: BlockManager,
              scheduled: Sequence[tuple[Request, int, int]], chunks: Sequence[ChunkSpec],
              token_budget: int) -> list[tuple[int, list[int]]]:
    """Runs one target forward pass over the scheduled chunks, with guesses for the decodes.

    Args:
      runner: the target's runner.
      block_manager: the target's allocator; pages for the guesses are allocated here (only from what the
        plan left free) and those of rejected guesses released again.
      scheduled: (request, start, num_tokens) per chunk, as the engine allocated them.
      chunks: the matching `ChunkSpec`s.
      token_budget: tokens the plan left unused this step (guesses must fit in it).

    Returns:
      Per chunk: (tokens of the sequence now in the KV cache, tokens to emit in order); nothing to emit for
      a prompt chunk that does not reach the end of its prompt.
    """
    max_drafts = []
    for req, start, n in scheduled:
      d = 0
      if n == 1 and start == req.num_tokens - 1 and req.num_generated > 0:  # A decode.
        d = min(self.k, req.sampling.max_tokens - req.num_generated - 1, token_budget)
        while d > 0 and not block_manager.allocate(req.request_id, start + 1 + d):
          d -= 1
        token_budget -= d
      max_drafts.append(d)
    requests = [r for r, _, _ in scheduled]
    t0 = time.perf_counter()
    proposals = (self.proposer.propose(requests, max_drafts) if any(max_drafts)
                 else Proposals(counts=(0,) * len(scheduled)))
    t1 = time.perf_counter()
    num_drafts = proposals.counts
    if any(num_drafts):
      # Guesses that stay on the device get placeholder rows here; the verification writes them in.
      guesses = proposals.token_ids or tuple((0,) * d for d in num_drafts)
      chunks = [dataclasses.replace(c, token_ids=list(c.token_ids) + list(g),
                                    page_table=block_manager.page_table(r.request_id)) if g else c
                for c, g, r in zip(chunks, guesses, requests)]
    shape = self.buckets.pick(sum(len(c.token_ids) for c in chunks), len(chunks),
                              max(len(c.page_table) for c in chunks))
    batch = pack(chunks, self.page_size, shape)
    if any(num_drafts):
      batch.update(self._draft_arrays(proposals, shape[1]))
      accepted, final, draft_tokens = runner.call(verify_impl(_samples(requests)), batch, extra=proposals.device)
    else:
      accepted, final, draft_tokens = np.zeros(shape[1], np.int32), runner.run(batch), None
    t2 = time.perf_counter()
    results = []
    for s, (req, start, n) in enumerate(scheduled):
      if max_drafts[s]:
        a = int(accepted[s])
        computed = start + 1 + a
        block_manager.truncate(req.request_id, computed)
        self.proposer.rollback(req.request_id, computed)
        results.append((computed, (draft_tokens[s, :a].tolist() if a else []) + [int(final[s])]))
      else:
        done = start + n >= req.num_tokens
        results.append((start + n, [int(final[s])] if done else []))
    self._count(num_forwards=1, num_verify_forwards=int(any(num_drafts)),
                num_generated_tokens=sum(len(t) for _, t in results), num_drafts=sum(d > 0 for d in num_drafts),
                num_draft_tokens=sum(num_drafts),
                num_accepted_tokens=sum(int(accepted[s]) for s, d in enumerate(num_drafts) if d),
                propose_seconds=t1 - t0, target_seconds=t2 - t1)
    return results

  def _draft_arrays(self, proposals: Proposals, s_pad: int) -> dict[str, np.ndarray]:
    counts = np.zeros(s_pad, np.int32)
    counts[:len(proposals.counts)] = proposals.counts
    if proposals.token_ids is None:  # On the device: where each sequence's guesses are.
      rows = np.full(s_pad, -1, np.int32)
      rows[:len(proposals.rows)] = proposals.rows
      return dict(num_drafts=counts, draft_rows=rows)
    tokens = np.zeros((s_pad, self.k), np.int32)
    for s, g in enumerate(proposals.token_ids):
      tokens[s, :len(g)] = g
    return dict(num_drafts=counts, draft_tokens=tokens)

  def free(self, request_id: str) -> None:
    """The request ended or was preempted: drop the proposer's state for it."""
    self.proposer.free(request_id)

  def check_no_leaks(self, idle: bool) -> None:
    self.proposer.check_no_leaks(idle)

  def warmup_calls(self, runner: ModelRunner, vocab: int) -> list[runner_lib.WarmupCall]:
    """Verification (greedy and sampled) and the draft's passes for every shape bucket, for the engine's
    warm-up to compile."""
    shapes = self.buckets.all_shapes()
    calls = []
    for shape in shapes:
      batch = pack([], self.page_size, shape)
      s_pad = shape[1]
      for sampled in (False, True):
        if self.config.method is SpeculativeMethod.DRAFT:
          extra = {"guess_tokens": np.zeros((s_pad, self.k), np.int32)}
          if sampled:
            extra["guess_probs"] = np.zeros((s_pad, self.k, vocab), np.float32)
          extra = jax.device_put(extra, runner.output_placement)  # As the draft pass's outputs are.
          proposals = Proposals(counts=(), device=extra, rows=())
        else:
          extra, proposals = None, Proposals(counts=(), token_ids=())
        calls.append(runner_lib.WarmupCall(runner, {**batch, **self._draft_arrays(proposals, s_pad)},
                                           impl=verify_impl(sampled), extra=extra))
    return calls + self.proposer.warmup_calls(shapes)

  @property
  def num_compilations(self) -> int:
    """Verification and draft programs compiled so far (shared by engines of the same models and shapes)."""
    return sum(runner_lib.num_compilations_of(verify_impl(sampled)) +
               runner_lib.num_compilations_of(draft_impl(self.k, sampled)) for sampled in (False, True))


def _samples(requests: Sequence[Request]) -> bool:
  """Whether some request of the step samples (temperature > 0): the step then needs the sampled programs."""
  return any(r.sampling.temperature > 0 for r in requests)
