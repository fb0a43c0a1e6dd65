"""Speculative decoding's settings (`SpeculativeConfig`, validated when built) and counters (`SpecStats`)."""

from __future__ import annotations

import dataclasses
import enum


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
