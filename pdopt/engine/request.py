"""Requests, sampling parameters, and the per-request timestamps that metrics are computed from."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

from pdopt.cache.block_manager import page_keys
from pdopt.metrics import RequestRecord
from pdopt.scheduling import RequestView, is_decoding
from pdopt.workloads.prompts import TokenIds


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each generated token and when to stop; validated when built.

  Attributes:
    max_tokens: tokens to generate at most (>= 1).
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 keeps all).
    top_p: keep the smallest set of tokens whose probability reaches top_p, in (0, 1].
    seed: per-request seed; the same seed and prompt give the same tokens whatever else runs. None draws
      one from the engine's seed.
    stop_token_ids: generation stops after any of these (the token is kept in the output).
    ignore_eos: do not stop at the model's EOS ids (benchmarks replaying fixed output lengths).

  Raises:
    ValueError: naming the first bad field, its value and what is valid.
  """
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_("max_tokens", checked_int("SamplingParams.max_tokens", self.max_tokens, low=1))
    set_("top_k", checked_int("SamplingParams.top_k", self.top_k, low=0))
    if self.seed is not None:
      set_("seed", checked_int("SamplingParams.seed", self.seed, low=0, high=2**32 - 1))
    if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
      raise ValueError(f"SamplingParams.temperature={self.temperature!r}; valid: a number >= 0 (0 is greedy)")
    if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingParams.top_p={self.top_p!r}; valid: a number in (0, 1]")
    if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Iterable):
      raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r}; valid: a sequence of token ids")
    set_("stop_token_ids", tuple(checked_int("SamplingParams.stop_token_ids[]", t, low=0)
                                 for t in self.stop_token_ids))
    if not isinstance(self.ignore_eos, (bool, np.bool_)):
      raise ValueError(f"SamplingParams.ignore_eos={self.ignore_eos!r}; valid: True or False")


def checked_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
  """`value` as a Python int if it is an integer (not a bool) in [low, high]; else ValueError naming `name`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name}={value!r}; valid: an integer" + _range(low, high))
  value = int(value)
  if (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"{name}={value!r}; valid: an integer" + _range(low, high))
  return value


def _range(low: int | None, high: int | None) -> str:
  if low is not None and high is not None:
    return f" in [{low}, {high}]"
  return f" >= {low}" if low is not None else (f" <= {high}" if high is not None else "")


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and not math.isnan(value)


class RequestStatus(enum.Enum):
  WAITING = "waiting"  # Not started, or preempted and waiting to recompute.
  RUNNING = "running"
  FINISHED = "finished"
  ABORTED = "aborted"
  REJECTED = "rejected"
  HANDED_OFF = "handed_off"  # Prefilled here, continues on another engine (disaggregated serving).

  @property
  def done(self) -> bool:
    # By value: a string hashes at C speed, an enum member through `Enum.__hash__` (this runs per request at
    # every step).
    return self._value_ in _ENDED


_ENDED = frozenset((RequestStatus.FINISHED.value, RequestStatus.ABORTED.value, RequestStatus.REJECTED.value))


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
  priority: int = 0  # Its class: 0 interactive, 1 batch (policies may order by it).
  client: str = ""  # Who sent it (fairness across clients).
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
  decode_stall_s: float = 0.0  # Seconds it spent decoding in steps that also ran prompt tokens, or waited on them.
  swapped: Any = None  # Its K/V on the host while it is preempted by swapping (`EngineConfig.preemption_mode`).
  # Prompt plus `max_tokens`: the length at which it ends, unless the engine's `max_model_len` is shorter.
  length_limit: int = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if not self.all_token_ids:
      self.all_token_ids = list(self.prompt_token_ids)
    self.length_limit = len(self.prompt_token_ids) + self.sampling.max_tokens

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
  def is_decoding(self) -> bool:
    """Running and generating: every token but the last generated one has its K/V cached, so the next step
    computes one token (`pdopt.scheduling.is_decoding`, the one definition of a decode)."""
    num_tokens = len(self.all_token_ids)
    return is_decoding(self.status is RequestStatus.RUNNING, num_tokens, self.num_computed_tokens,
                       num_tokens - len(self.prompt_token_ids))

  def prompt_keys(self, page_size: int) -> Sequence[bytes]:
    """The prefix-cache keys of the prompt's full pages (`block_manager.page_keys`) where the prompt keeps them:
    a `TokenIds` prompt does from its second use on in this process (a search's simulations submit the same
    prompts again and again); else () and the block manager hashes the pages as they fill."""
    prompt = self.prompt_token_ids
    if type(prompt) is not TokenIds:  # pylint: disable=unidiomatic-typecheck
      return ()
    return prompt.derived(("page_keys", page_size), lambda ids: tuple(page_keys(None, ids, page_size)))

  @property
  def num_pending_tokens(self) -> int:
    """Tokens still to run through the model before the next token can be sampled."""
    return self.num_tokens - self.num_computed_tokens

  def view(self, num_pages_held: int = 0, ahead: int = 0) -> RequestView:
    """The request as a policy sees it: waiting (no pages held), or running with `num_pages_held` pages and
    shown `ahead` decode tokens further than it is (the steps in flight of an asynchronous executor)."""
    running = self.status is RequestStatus.RUNNING
    # A request swapped out comes back with its computed tokens (their pages must fit again).
    computed = self.num_computed_tokens + ahead if running or self.swapped is not None else 0
    num_tokens, prompt_len = len(self.all_token_ids), len(self.prompt_token_ids)
    # Positional, in `RequestView`'s field order: this runs for every request at every step.
    return RequestView(self.request_id, self.arrival_time, prompt_len, num_tokens + ahead, computed, num_pages_held,
                       num_tokens - prompt_len + ahead, self.sampling.max_tokens, running, self.first_token_time,
                       self.priority, self.client)

  def decode_view(self, num_computed_tokens: int, num_pages_held: int) -> RequestView:
    """`view` of the request while it decodes, shown with `num_computed_tokens` computed tokens (its next token
    the one after them) and `num_pages_held` pages: from these and the fields that no longer change once it
    decodes (its first token came out), so the view stays what it was when the values were read."""
    prompt_len = len(self.prompt_token_ids)
    return RequestView(self.request_id, self.arrival_time, prompt_len, num_computed_tokens + 1, num_computed_tokens,
                       num_pages_held, num_computed_tokens + 1 - prompt_len, self.sampling.max_tokens, True,
                       self.first_token_time, self.priority, self.client)

  def stop(self, tokens: Sequence[int], eos: frozenset[int], max_model_len: int) -> tuple[int, str | None]:
    """Where the request ends among `tokens`, its next output tokens: (index of the last token it keeps, why)
    or (-1, None) if it goes on. Reasons: "stop" (a stop token), "eos" (one of `eos`, unless ignored),
    "length" (max_tokens or max_model_len)."""
    sampling, num_tokens = self.sampling, len(self.all_token_ids)
    room = min(sampling.max_tokens - num_tokens + len(self.prompt_token_ids), max_model_len - num_tokens)
    stops = sampling.stop_token_ids
    if stops or not sampling.ignore_eos:
      for i, token in enumerate(tokens[:room]):
        if token in stops:
          return i, "stop"
        if not sampling.ignore_eos and token in eos:
          return i, "eos"
    return (room - 1, "length") if len(tokens) >= room else (-1, None)

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
        slo_miss=self.status is RequestStatus.REJECTED, priority=self.priority, client=self.client,
        decode_stall_s=self.decode_stall_s)


class RequestOutput:
  """What `Engine.step` and `Engine.generate` return for a request, as it was when returned.

  `step` builds one per request that got a token, so the generated ids are read only when asked for: the
  request's token list only grows, and a copy of every output at every step would cost its length each time.

  Attributes:
    request_id: the id given to add_request.
    prompt_token_ids: the prompt.
    token_ids: generated ids so far (a new list at each read).
    finished: the request has ended (finished, aborted or rejected).
    finish_reason: "length", "stop", "eos", "abort", or the rejection reason.
    status: the request status.
  """
  __slots__ = ("request_id", "prompt_token_ids", "finished", "finish_reason", "status", "_ids", "_num_tokens")

  def __init__(self, request: Request):
    status = request.status
    self.request_id, self.prompt_token_ids = request.request_id, request.prompt_token_ids
    self.finished, self.finish_reason, self.status = status.done, request.finish_reason, status
    self._ids, self._num_tokens = request.all_token_ids, len(request.all_token_ids)

  @property
  def token_ids(self) -> list[int]:
    return self._ids[len(self.prompt_token_ids):self._num_tokens]

  def __repr__(self) -> str:
    return (f"RequestOutput(request_id={self.request_id!r}, token_ids={self.token_ids!r}, "
            f"finished={self.finished}, finish_reason={self.finish_reason!r}, status={self.status.value!r})")


def validate_prompt(prompt_token_ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
  """Returns the prompt as a tuple of ints, or raises ValueError naming the bad value.

  Token ids must be integers (Python or NumPy, not bools or floats) in [0, vocab_size). `TokenIds` drawn below
  a bound within the vocabulary are not read again.
  """
  if type(prompt_token_ids) is TokenIds and prompt_token_ids.bound <= vocab_size:  # pylint: disable=unidiomatic-typecheck
    if not prompt_token_ids:
      raise ValueError("prompt_token_ids is empty: a prompt needs at least one token")
    return prompt_token_ids
  if isinstance(prompt_token_ids, np.ndarray):
    if prompt_token_ids.ndim != 1 or prompt_token_ids.dtype.kind not in "iu":
      raise ValueError(f"prompt_token_ids must be a 1-D array of integers, got dtype {prompt_token_ids.dtype} "
                       f"shape {prompt_token_ids.shape}")
    ids = tuple(prompt_token_ids.tolist())
  elif isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Iterable):
    raise ValueError(f"prompt_token_ids must be a sequence of integer token ids, got {prompt_token_ids!r:.80}")
  else:
    ids = tuple(prompt_token_ids)
    if not set(map(type, ids)) <= {int}:  # The common case, plain ints, is checked at C speed.
      for t in ids:
        if type(t) is not int and (isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral)):
          raise ValueError(f"prompt token id {t!r} is not an integer; valid: integers in [0, {vocab_size})")
      ids = tuple(map(int, ids))
  if not ids:
    raise ValueError("prompt_token_ids is empty: a prompt needs at least one token")
  if min(ids) < 0 or max(ids) >= vocab_size:
    bad = next(t for t in ids if not 0 <= t < vocab_size)
    raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
  return ids


def validate_request(prompt_token_ids: Sequence[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                     page_size: int, num_pages: int) -> tuple[int, ...]:
  """The prompt as a tuple of ints if the request can be served; else ValueError naming the bad value: not a
  `SamplingParams`, a bad prompt (`validate_prompt`), prompt plus `max_tokens` over `max_model_len`, or more
  KV pages than the whole pool of `num_pages` pages of `page_size` tokens."""
  if not isinstance(params, SamplingParams):
    raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
  prompt = validate_prompt(prompt_token_ids, vocab_size)
  if len(prompt) + params.max_tokens > max_model_len:
    raise ValueError(f"prompt length {len(prompt)} + max_tokens {params.max_tokens} exceeds max_model_len "
                     f"{max_model_len}")
  pages = math.ceil((len(prompt) + params.max_tokens - 1) / page_size)  # The last token needs no slot.
  if pages > num_pages:
    raise ValueError(f"the request needs {pages} KV pages ({len(prompt)} prompt + {params.max_tokens} max_tokens "
                     f"tokens) but the pool has {num_pages} (EngineConfig.num_pages)")
  return prompt
