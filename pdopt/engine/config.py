"""`EngineConfig`: the engine's settings, validated when built; every error names the field, the value and
what would be valid."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from pdopt.engine.batch import Buckets, geometric_buckets
from pdopt.engine.request import checked_int
from pdopt.engine.speculative.config import SpeculativeConfig
from pdopt.scheduling import POLICIES, SchedulingConfig

# The values of `pallas_kernels.api.Backend` (a test keeps the two equal).
AttentionBackend = Literal["auto", "reference", "pallas"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

# How a preempted request gives its pages back: "recompute" drops its K/V (it is prefilled again when it
# resumes); "swap" copies its pages to host memory and back when it resumes (no recomputation).
PreemptionMode = Literal["recompute", "swap"]
PREEMPTION_MODES: tuple[str, ...] = get_args(PreemptionMode)

# "auto" stores K/V in the model's dtype; the others quantize them (`pdopt.cache.kv_cache`).
KVCacheDtype = Literal["auto", "int8", "fp8"]
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KVCacheDtype)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Engine settings.

  Attributes:
    policy: scheduling policy name (see `pdopt.scheduling.POLICIES`).
    page_size: tokens per KV page.
    num_pages: pages in the pool (all layers share page ids).
    max_num_batched_tokens: token budget of one step.
    max_num_seqs: sequences in one step.
    chunk_size: largest prompt chunk per request per step (None: the token budget).
    max_model_len: longest prompt + output (tokens); None takes the model's context length.
    enable_prefix_caching: share full pages between requests with the same prefix.
    ttft_slo_ms, tpot_slo_ms: targets for `slo_aware` (milliseconds).
    attention_backend: "auto", "reference" or "pallas" (`pallas_kernels.api`).
    kv_cache_dtype: "auto" stores K/V in the model dtype; "int8" or "fp8" (e4m3) store them quantized with
      a float32 scale per (KV head, token), quantized when written and dequantized inside attention.
    seed: draws per-request seeds for requests that give none.
    handoff_after_prefill: a prefill instance of disaggregated serving: once a request has its first token
      (and is not finished), it leaves the running set with its pages held, for `take_handoffs`.
    token_buckets, seq_buckets, page_buckets: padded sizes (increasing); None derives geometric buckets
      (factor 4, from 16 tokens, 1 sequence and 4 pages).
    speculative: speculative decoding (`pdopt.engine.speculative`), or None; method "draft" needs
      `Engine(..., draft_model=...)`. Guesses only use token budget and pages the policy left free.
    async_decode: overlap the host with the device while decoding steadily (`async_executor`): a step made
      only of decodes is dispatched without waiting for its tokens; the next `step()` asks the policy about
      the state after it and, if the answer is the same sequences decoding one more token each (nothing
      waiting, no preemption, no length limit reached), dispatches that step at once with its input tokens
      taken from the previous step's output on the device, and only then reads the previous step's tokens
      and does its bookkeeping while the new step runs. Outputs are identical to the synchronous engine; a
      request that stops on a stop token has one more token computed and dropped. Not with `speculative`,
      `handoff_after_prefill` or a mesh.
    preemption_mode: "recompute" (vLLM's default) or "swap" (`PREEMPTION_MODES`): a preempted request's pages
      go to host memory and come back when it resumes, where the copy is cheaper than the prefill again.
    num_scheduler_steps: with `async_decode`, the chained steps of steady decoding run this many decode
      steps in one device program, so the host's work per step is paid once per that many tokens. A block
      runs only when every request has room for all its tokens (max_tokens, max_model_len) and the pool has
      their pages; otherwise single steps are chained. Outputs stay identical to the synchronous engine; a
      request that stops on a stop token mid-block has the rest of the block computed and dropped, a
      request that arrives waits for the block in flight, and the tokens of a block reach the outputs
      together (their ITLs are bursts).

  Raises:
    ValueError: naming the first bad field, its value and what is valid.
  """
  policy: str = "chunked"
  page_size: int = 16
  num_pages: int = 512
  max_num_batched_tokens: int = 512
  max_num_seqs: int = 64
  chunk_size: int | None = None
  max_model_len: int | None = None
  enable_prefix_caching: bool = True
  ttft_slo_ms: float | None = None
  tpot_slo_ms: float | None = None
  attention_backend: AttentionBackend = "auto"
  kv_cache_dtype: KVCacheDtype = "auto"
  seed: int = 0
  handoff_after_prefill: bool = False
  token_buckets: tuple[int, ...] | None = None
  seq_buckets: tuple[int, ...] | None = None
  page_buckets: tuple[int, ...] | None = None
  speculative: SpeculativeConfig | None = None
  async_decode: bool = False
  num_scheduler_steps: int = 1
  preemption_mode: PreemptionMode = "recompute"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    if self.policy not in POLICIES:
      raise ValueError(f"EngineConfig.policy={self.policy!r}; valid: {', '.join(sorted(POLICIES))}")
    for name in ("page_size", "num_pages", "max_num_batched_tokens", "max_num_seqs", "num_scheduler_steps"):
      set_(name, checked_int(f"EngineConfig.{name}", getattr(self, name), low=1))
    for name in ("chunk_size", "max_model_len"):
      if getattr(self, name) is not None:
        set_(name, checked_int(f"EngineConfig.{name}", getattr(self, name), low=1))
    set_("seed", checked_int("EngineConfig.seed", self.seed, low=0))
    for name in ("enable_prefix_caching", "handoff_after_prefill", "async_decode"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}; valid: True or False")
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not 0 < value < math.inf):
        raise ValueError(f"EngineConfig.{name}={value!r}; valid: a number of milliseconds > 0, or None")
    if self.attention_backend not in ATTENTION_BACKENDS:
      raise ValueError(f"EngineConfig.attention_backend={self.attention_backend!r}; valid: "
                       f"{', '.join(ATTENTION_BACKENDS)}")
    if self.preemption_mode not in PREEMPTION_MODES:
      raise ValueError(f"EngineConfig.preemption_mode={self.preemption_mode!r}; valid: {', '.join(PREEMPTION_MODES)}")
    if self.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
    for name in ("token_buckets", "seq_buckets", "page_buckets"):
      value = getattr(self, name)
      if value is not None:
        set_(name, _buckets(f"EngineConfig.{name}", value))
    for name, bucket, limit in (("token_buckets", self.token_buckets, self.max_num_batched_tokens),
                                ("seq_buckets", self.seq_buckets, self.max_num_seqs)):
      if bucket is not None and bucket[-1] < limit:
        raise ValueError(f"EngineConfig.{name}={bucket}; valid: increasing sizes whose largest is at least "
                         f"{limit} ({'max_num_batched_tokens' if name == 'token_buckets' else 'max_num_seqs'})")
    if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
      raise ValueError(f"EngineConfig.speculative={self.speculative!r}; valid: a SpeculativeConfig or None")
    if self.async_decode and (self.speculative is not None or self.handoff_after_prefill):
      raise ValueError("EngineConfig.async_decode=True does not combine with speculative or handoff_after_prefill")
    if self.num_scheduler_steps > 1 and not self.async_decode:
      raise ValueError(f"EngineConfig.num_scheduler_steps={self.num_scheduler_steps}; valid: 1, or more with "
                       "async_decode=True")

  @property
  def kv_quant(self) -> str | None:
    """The quantized storage of the KV cache ("int8", "fp8"), or None."""
    return None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

  def model_len(self, context: int) -> int:
    """The longest prompt + output for a model of `context` positions: `max_model_len`, or the context.

    Raises:
      ValueError: a `max_model_len` longer than the context.
    """
    if self.max_model_len is not None and self.max_model_len > context:
      raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's context {context}")
    return self.max_model_len or context

  def buckets(self, max_model_len: int) -> Buckets:
    """The step's padded shapes for sequences of up to `max_model_len` tokens: the configured buckets, or
    geometric ones (factor 4) from 16 tokens, 1 sequence and 4 pages.

    Raises:
      ValueError: page buckets that do not cover `max_model_len`.
    """
    max_pages = math.ceil(max_model_len / self.page_size)
    buckets = Buckets(
        tokens=self.token_buckets or geometric_buckets(16, self.max_num_batched_tokens),
        # From one sequence: a lone decoding sequence padded to four ran its decode kernel over three empty
        # sequences' programs as well (H200, Llama-3.2-1B shape: 2.7 us more per layer; NOTES.md, ## engine).
        seqs=self.seq_buckets or geometric_buckets(1, self.max_num_seqs),
        pages=self.page_buckets or geometric_buckets(4, max_pages))
    if buckets.pages[-1] < max_pages:
      raise ValueError(f"EngineConfig.page_buckets={self.page_buckets} do not cover the {max_pages} pages a "
                       f"sequence of max_model_len={max_model_len} tokens needs")
    return buckets

  def scheduling(self) -> SchedulingConfig:
    return SchedulingConfig(policy=self.policy, max_num_batched_tokens=self.max_num_batched_tokens,
                            max_num_seqs=self.max_num_seqs, chunk_size=self.chunk_size,
                            ttft_slo_ms=self.ttft_slo_ms, tpot_slo_ms=self.tpot_slo_ms)


def _buckets(name: str, value) -> tuple[int, ...]:
  try:
    sizes = tuple(checked_int(f"{name}[]", b, low=1) for b in value)
  except TypeError:
    raise ValueError(f"{name}={value!r}; valid: a sequence of increasing sizes >= 1, or None") from None
  if not sizes or any(a >= b for a, b in zip(sizes, sizes[1:])):
    raise ValueError(f"{name}={value!r}; valid: a non-empty sequence of increasing sizes >= 1, or None")
  return sizes
