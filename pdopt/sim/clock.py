"""`VirtualClock`: time that moves only when told to (the simulator's clock, and deterministic replays)."""

from __future__ import annotations


class VirtualClock:
  """A clock that moves only when told to.

  Pass it as the engine's `clock`; `pdopt.benchmark.replay` then sleeps on it instead of the wall clock, and
  the simulated executor advances it by each step's predicted time.

  Args:
    start: the initial time (s).
    tick: seconds added after every reading, a crude stand-in for the cost of work in tests that run a real
      engine on it (the engine reads the clock twice per step), so that arrivals keep coming while the engine
      is busy. 0 freezes time except for `sleep` and `advance`.
  """

  def __init__(self, start: float = 0.0, tick: float = 0.0):
    if tick < 0:
      raise ValueError(f"VirtualClock tick must be >= 0 seconds, got {tick!r}")
    self.now = float(start)
    self.tick = float(tick)

  def __call__(self) -> float:
    t = self.now
    self.now += self.tick
    return t

  def sleep(self, seconds: float) -> None:
    """Jumps `seconds` ahead (negative values are ignored, like a late wake-up)."""
    self.now += max(0.0, float(seconds))

  def advance_to(self, t: float) -> None:
    """Moves to time `t` (seconds) if that is later than now."""
    self.now = max(self.now, float(t))

  def rewind_to(self, t: float) -> None:
    """Moves back to time `t` (seconds): the simulator taking back steps it ran ahead that never happened."""
    if t > self.now:
      raise ValueError(f"rewind_to({t!r}) is later than now ({self.now!r})")
    self.now = float(t)
