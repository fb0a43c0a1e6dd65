"""Request lengths: synthetic draws, and clamping to what the model's context can hold."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

LengthDistribution = Literal["fixed", "uniform"]
LENGTH_DISTRIBUTIONS: tuple[str, ...] = get_args(LengthDistribution)


def synthetic_lengths(num_requests: int, mean_len: int, distribution: LengthDistribution = "fixed",
                      range_ratio: float = 0.0, seed: int | np.random.Generator = 0) -> np.ndarray:
  """Draws token lengths.

  Args:
    num_requests: N >= 0.
    mean_len: the length (tokens, >= 1) for "fixed", the centre of the range for "uniform".
    distribution: "fixed" (every request `mean_len`) or "uniform" (integers drawn uniformly from
      [round(mean_len * (1 - range_ratio)), round(mean_len * (1 + range_ratio))], at least 1; vLLM's
      `random` dataset convention).
    range_ratio: half-width of the uniform range relative to `mean_len`, in [0, 1].
    seed: an int seed or a numpy Generator.

  Returns:
    [N] int64 lengths >= 1.

  Raises:
    ValueError: an unknown distribution (the valid names listed), mean_len < 1, or range_ratio outside [0, 1].
  """
  if distribution not in LENGTH_DISTRIBUTIONS:
    raise ValueError(f"unknown length distribution {distribution!r}; valid: {list(LENGTH_DISTRIBUTIONS)}")
  if mean_len < 1:
    raise ValueError(f"mean_len must be >= 1 token, got {mean_len!r}")
  if not 0.0 <= range_ratio <= 1.0:
    raise ValueError(f"range_ratio must be in [0, 1], got {range_ratio!r}")
  if distribution == "fixed":
    return np.full((num_requests,), mean_len, np.int64)
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  low = max(1, round(mean_len * (1.0 - range_ratio)))
  high = max(low, round(mean_len * (1.0 + range_ratio)))
  return rng.integers(low, high + 1, size=num_requests, dtype=np.int64)


def clamp_lengths(prompt_lens: np.ndarray, output_lens: np.ndarray, max_model_len: int,
                  max_prompt_len: int | None = None,
                  max_output_len: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """Fits lengths to the model context: prompt + output <= max_model_len, both >= 1, under optional caps.

  In order: both lengths are raised to at least 1; the caps apply; then a request still over the context
  keeps its output length and loses prompt tokens (down to 1); only an output that alone does not fit is cut,
  to max_model_len - 1.

  Args:
    prompt_lens: [N] prompt lengths in tokens.
    output_lens: [N] output lengths in tokens.
    max_model_len: the model context in tokens (>= 2).
    max_prompt_len: optional cap on prompt tokens (>= 1).
    max_output_len: optional cap on output tokens (>= 1).

  Returns:
    (prompt_lens [N] int64, output_lens [N] int64, the number of requests with either length changed).

  Raises:
    ValueError: max_model_len < 2, a cap < 1, or arrays of different shapes.
  """
  if max_model_len < 2:
    raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {max_model_len!r}")
  for name, cap in (("max_prompt_len", max_prompt_len), ("max_output_len", max_output_len)):
    if cap is not None and cap < 1:
      raise ValueError(f"{name} must be >= 1 or None, got {cap!r}")
  p0 = np.asarray(prompt_lens, np.int64)
  o0 = np.asarray(output_lens, np.int64)
  if p0.shape != o0.shape:
    raise ValueError(f"prompt_lens {p0.shape} and output_lens {o0.shape} differ in shape")
  p = np.maximum(p0, 1)
  o = np.maximum(o0, 1)
  if max_prompt_len is not None:
    p = np.minimum(p, max_prompt_len)
  if max_output_len is not None:
    o = np.minimum(o, max_output_len)
  o = np.minimum(o, max_model_len - 1)
  p = np.minimum(p, max_model_len - o)
  num_clamped = int(np.count_nonzero((p != p0) | (o != o0)))
  return p, o, num_clamped
