"""Requests, sampling parameters, and the per-request timestamps that metrics are computed from."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

from pdopt.metrics import RequestRecord


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each generated token and when to stop.

  Attributes:
    max_tokens: tokens to generate at most (>= 1).
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 keeps all).
    top_p: keep the smallest set of tokens whose probability reaches top_p, in (0, 1].
    seed: per-request seed; the same seed and prompt give the same tokens whatever else runs. None draws
      one from the engine's seed.
    stop_token_ids: generation stops after any of these (the token is kept in the output).
    ignore_eos: do not stop at the model's EOS ids (benchmarks replaying fixed output lengths).
  """
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def validate(self) -> None:
    """Raises ValueError naming the first bad field and its value."""
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
    if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
    if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
      raise ValueError(f"seed must be an int in [0, 2**32) or None, got {self.seed!r}")


class RequestStatus(enum.Enum):
  WAITING = "waiting"  # Not started, or preempted and waiting to recompute.
  RUNNING = "running"
  FINISHED = "finished"
  ABORTED = "aborted"
  REJECTED = "rejected"
  HANDED_OFF = "handed_off"  # Prefilled here, continues on another engine (disaggregated serving).

  @property
  def done(self) -> bool:
    return self in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.REJECTED)


@dataclasses.dataclass
class Request:
  """One request's tokens, progress and timestamps (seconds on the engine's clock).

  `num_computed_tokens` tokens of `all_token_ids` have their K/V in the cache; the next forward pass
  processes tokens from there on. When it reaches the last token, a new token is sampled and appended.
  """
  request_id: str
  prompt_token_ids: tuple[int, ...]
  sampling: SamplingParams
  seed: int
  arrival_time: float
  all_token_ids: list[int] = dataclasses.field(default_factory=list)  # Prompt, then generated tokens.
  status: RequestStatus = RequestStatus.WAITING
  num_computed_tokens: int = 0
  num_cached_tokens: int = 0  # Prompt tokens served by the prefix cache at the last admission.
  num_prefill_tokens_computed: int = 0  # Tokens this request ran through prefill, recomputation included.
  num_preemptions: int = 0
  first_scheduled_time: float | None = None
  first_token_time: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)
  finish_time: float | None = None
  finish_reason: str | None = None

  def __post_init__(self):
    if not self.all_token_ids:
      self.all_token_ids = list(self.prompt_token_ids)

  @property
  def prompt_len(self) -> int:
    return len(self.prompt_token_ids)

  @property
  def num_tokens(self) -> int:
    return len(self.all_token_ids)

  @property
  def output_token_ids(self) -> list[int]:
    return self.all_token_ids[len(self.prompt_token_ids):]

  @property
  def num_generated(self) -> int:
    return len(self.all_token_ids) - len(self.prompt_token_ids)

  @property
  def num_pending_tokens(self) -> int:
    """Tokens still to run through the model before the next token can be sampled."""
    return self.num_tokens - self.num_computed_tokens

  def to_record(self) -> RequestRecord:
    """The timestamps in the form `pdopt.metrics` reads."""
    status = {RequestStatus.FINISHED: "finished", RequestStatus.ABORTED: "aborted",
              RequestStatus.REJECTED: "rejected"}.get(self.status)
    if status is None:
      raise ValueError(f"request {self.request_id!r} has not ended (status {self.status.value})")
    return RequestRecord(
        request_id=self.request_id, prompt_len=self.prompt_len, output_len=self.num_generated,
        arrival_time=self.arrival_time, first_scheduled_time=self.first_scheduled_time,
        first_token_time=self.first_token_time, token_times=tuple(self.token_times),
        finish_time=self.finish_time, status=status, reason=self.finish_reason,
        slo_miss=self.status is RequestStatus.REJECTED)


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """What `Engine.step` and `Engine.generate` return for a request.

  Attributes:
    request_id: the id given to add_request.
    prompt_token_ids: the prompt.
    token_ids: generated ids so far.
    finished: the request has ended (finished, aborted or rejected).
    finish_reason: "length", "stop", "eos", "abort", or the rejection reason.
    status: the request status.
  """
  request_id: str
  prompt_token_ids: tuple[int, ...]
  token_ids: list[int]
  finished: bool
  finish_reason: str | None
  status: RequestStatus

  @staticmethod
  def of(request: Request) -> "RequestOutput":
    return RequestOutput(request.request_id, request.prompt_token_ids, request.output_token_ids,
                         request.status.done, request.finish_reason, request.status)


def validate_prompt(prompt_token_ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
  """Returns the prompt as a tuple of ints, or raises ValueError naming the bad value."""
  try:
    ids = tuple(int(t) for t in prompt_token_ids)
  except (TypeError, ValueError):
    raise ValueError(f"prompt_token_ids must be a sequence of ints, got {prompt_token_ids!r:.80}") from None
  if not ids:
    raise ValueError("prompt_token_ids is empty: a prompt needs at least one token")
  for t in ids:
    if not 0 <= t < vocab_size:
      raise ValueError(f"prompt token id {t} is outside the vocabulary [0, {vocab_size})")
  return ids
