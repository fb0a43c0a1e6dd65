"""`DeploymentConfig`: several engine instances, one OS process each, behind a router; validated when built and
placed on devices before any process starts."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from pdopt.engine.config import EngineConfig
from pdopt.engine.request import checked_int
from pdopt.models.config import ModelConfig

Mode = Literal["colocated", "disaggregated"]
MODES: tuple[str, ...] = get_args(Mode)

# How the router picks the instance for a new request: the one with the fewest requests it has not finished,
# each in turn, or the one that served the request's first prompt page before (its prefix cache holds it),
# least loaded otherwise.
RouterPolicy = Literal["least_loaded", "round_robin", "prefix_affinity"]
ROUTER_POLICIES: tuple[str, ...] = get_args(RouterPolicy)

Role = Literal["replica", "prefill", "decode"]


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
  """How many instances of which kind, on how many devices each.

  Attributes:
    mode: "colocated" (`num_decode` replicas that prefill and decode, as N servers behind a load balancer)
      or "disaggregated" (DistServe, Splitwise: `num_prefill` instances run prompts to their first token,
      then the request's KV pages move to one of `num_decode` decode instances, which continue it).
    num_prefill: prefill instances of a disaggregated deployment (None: 1); colocated ones have none.
    num_decode: decode instances, or replicas when colocated.
    devices_per_instance: devices of one instance, its tensor-parallel degree (GPUs; on CPU, cores).
    router: `ROUTER_POLICIES`.
    engine: the engine of every instance (`handoff_after_prefill` is set for prefill instances).
    decode_engine: the engine of decode instances if it differs (e.g. a larger pool or another policy).
    transfer_timeout_s: a KV transfer not done by then fails; its request starts over on another instance.

  Raises:
    ValueError: a bad field, named with its value and what is valid.
  """
  mode: Mode = "disaggregated"
  num_prefill: int | None = None
  num_decode: int = 1
  devices_per_instance: int = 1
  router: RouterPolicy = "least_loaded"
  engine: EngineConfig = EngineConfig()
  decode_engine: EngineConfig | None = None
  transfer_timeout_s: float = 30.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"DeploymentConfig.mode={self.mode!r}; valid: {', '.join(MODES)}")
    if self.router not in ROUTER_POLICIES:
      raise ValueError(f"DeploymentConfig.router={self.router!r}; valid: {', '.join(ROUTER_POLICIES)}")
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    set_("num_decode", checked_int("DeploymentConfig.num_decode", self.num_decode, low=1))
    set_("devices_per_instance", checked_int("DeploymentConfig.devices_per_instance", self.devices_per_instance,
                                             low=1))
    if self.mode == "disaggregated":
      set_("num_prefill", checked_int("DeploymentConfig.num_prefill", 1 if self.num_prefill is None
                                      else self.num_prefill, low=1))
    elif self.num_prefill:
      raise ValueError(f"DeploymentConfig.num_prefill={self.num_prefill!r}: a colocated deployment has no prefill "
                       "instances (0 or None)")
    else:
      set_("num_prefill", 0)
    for name in ("engine", "decode_engine"):
      value = getattr(self, name)
      if not isinstance(value, EngineConfig) and (name == "engine" or value is not None):
        raise ValueError(f"DeploymentConfig.{name}={value!r}; valid: an EngineConfig"
                         + (" or None" if name == "decode_engine" else ""))
    for engine in (self.engine, self.decode_engine):
      if engine is not None and (engine.speculative is not None or engine.async_decode):
        raise ValueError("DeploymentConfig: instances run the synchronous engine without speculation "
                         "(EngineConfig.speculative and async_decode must be off)")
    if not (isinstance(self.transfer_timeout_s, (int, float)) and 0 < self.transfer_timeout_s < math.inf):
      raise ValueError(f"DeploymentConfig.transfer_timeout_s={self.transfer_timeout_s!r}; valid: seconds > 0")

  @property
  def num_instances(self) -> int:
    return self.num_prefill + self.num_decode

  @property
  def num_devices(self) -> int:
    return self.num_instances * self.devices_per_instance

  @property
  def label(self) -> str:
    policy = self.engine.policy
    if self.mode == "disaggregated":
      return f"disagg-{self.num_prefill}P{self.num_decode}D-{policy}"
    return f"colocated-{self.num_decode}x-{policy}"

  def roles(self) -> list[Role]:
    """Each instance's role, in instance order (prefill instances first)."""
    if self.mode == "colocated":
      return ["replica"] * self.num_decode
    return ["prefill"] * self.num_prefill + ["decode"] * self.num_decode

  def engine_of(self, role: Role) -> EngineConfig:
    """The engine an instance of `role` runs."""
    if role == "prefill":
      return dataclasses.replace(self.engine, handoff_after_prefill=True)
    if role == "decode" and self.decode_engine is not None:
      return self.decode_engine
    return self.engine

  def placements(self, model: ModelConfig, devices: list[int], hosts: int = 1) -> list[list[int]]:
    """Places the instances: host h runs instances [h * n / hosts, (h + 1) * n / hosts) of the n (`host_of`),
    `devices_per_instance` of the host's `devices` each, in order.

    Returns:
      Each instance's devices on its host.

    Raises:
      ValueError: a host with more instances than its devices hold, more hosts than instances, or a
        tensor-parallel degree that does not divide the model's heads, KV heads, MLP width or vocabulary;
        named, before any process starts.
    """
    tp = self.devices_per_instance
    bad = [f"{name}={size}" for name, size in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads),
                                               ("intermediate_size", model.intermediate_size),
                                               ("vocab_size", model.vocab_size)) if size % tp]
    if bad:
      raise ValueError(f"DeploymentConfig.devices_per_instance={tp} does not divide the model's {', '.join(bad)}")
    if not isinstance(hosts, int) or not 1 <= hosts <= self.num_instances:
      raise ValueError(f"hosts={hosts!r}; valid: 1 to the deployment's {self.num_instances} instances")
    out = []
    for h in range(hosts):
      local = sum(host_of(i, self.num_instances, hosts) == h for i in range(self.num_instances))
      if local * tp > len(devices):
        raise ValueError(f"the deployment {self.label} puts {local} instances x {tp} devices = {local * tp} devices "
                         f"on host {h}, but {len(devices)} are available there ({devices})")
      out += [devices[j * tp:(j + 1) * tp] for j in range(local)]
    return out


def host_of(index: int, num_instances: int, hosts: int) -> int:
  """The host that runs instance `index` of `num_instances` spread over `hosts` in contiguous blocks."""
  return index * hosts // num_instances
