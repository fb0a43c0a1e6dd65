"""Which instance takes a request: the router policies of `DeploymentConfig.router`, shared by real
deployments (`router.Deployment`) and simulated ones (`pdopt.sim.deployment`)."""

from __future__ import annotations

import hashlib
import itertools
from typing import Mapping, Sequence

from pdopt.deploy.config import ROUTER_POLICIES


class Routing:
  """Picks instances by `policy`: "least_loaded" (the fewest requests not finished, the lowest index on a tie),
  "round_robin" (each in turn), or "prefix_affinity" (the instance that took the same first prompt page before,
  whose prefix cache may hold it; least loaded otherwise).

  Args:
    policy: one of `ROUTER_POLICIES`.
    page_size: tokens of the prompt's first page (the affinity key).
  """

  def __init__(self, policy: str, page_size: int):
    if policy not in ROUTER_POLICIES:
      raise ValueError(f"router policy {policy!r}; valid: {', '.join(ROUTER_POLICIES)}")
    self.policy, self.page_size = policy, page_size
    self._turn = itertools.count()
    self._home: dict[bytes, int] = {}

  def pick(self, candidates: Sequence[int], loads: Mapping[int, int], prompt: Sequence[int] = ()) -> int:
    """One of `candidates` (instance indices, not empty) given each one's load."""
    least = min(candidates, key=lambda c: (loads.get(c, 0), c))
    if self.policy == "round_robin":
      return candidates[next(self._turn) % len(candidates)]
    if self.policy == "prefix_affinity" and prompt:
      key = hashlib.sha256(repr(tuple(prompt[:self.page_size])).encode()).digest()
      chosen = self._home.get(key)
      if chosen not in candidates:
        chosen = least
      self._home[key] = chosen
      return chosen
    return least
