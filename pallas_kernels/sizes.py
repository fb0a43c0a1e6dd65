"""Power-of-two arithmetic for block sizes and shape buckets (Triton blocks, wgmma tiles, padded batches)."""

from __future__ import annotations


def is_power_of_2(n: int) -> bool:
  """Whether n is a positive power of two."""
  return n > 0 and n & (n - 1) == 0


def next_power_of_2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def floor_power_of_2(n: int) -> int:
  """The largest power of two <= n (1 for n <= 1)."""
  return 1 << (max(1, n).bit_length() - 1)


def power_of_2_divisor(n: int, at_most: int) -> int:
  """The largest power of two <= at_most (at least 1) that divides n."""
  b = floor_power_of_2(at_most)
  while n % b:
    b //= 2
  return b
