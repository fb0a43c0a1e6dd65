"""Model configuration: a frozen `ModelConfig`, named presets, and parsing of Hugging Face config.json.

Both config.json dialects are read: transformers 4.x (`rope_theta` plus an optional `rope_scaling` dict)
and transformers 5.x (`rope_parameters` holding `rope_theta`, `rope_type` and the scaling fields).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any, Mapping


class Family(enum.Enum):
  """Architectures of the Llama family that pdopt implements, by Hugging Face `model_type`."""
  LLAMA = "llama"
  QWEN2 = "qwen2"
  MISTRAL = "mistral"


class RopeType(enum.Enum):
  DEFAULT = "default"
  LINEAR = "linear"
  LLAMA3 = "llama3"


_ARCHITECTURES = {
    "LlamaForCausalLM": Family.LLAMA,
    "Qwen2ForCausalLM": Family.QWEN2,
    "MistralForCausalLM": Family.MISTRAL,
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `LLAMA3` uses all fields; `LINEAR` only `factor`."""
  rope_type: RopeType = RopeType.DEFAULT
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only Llama-family transformer.

  Attributes:
    family: architecture (decides nothing numerically beyond the fields below; kept for round trips).
    vocab_size, hidden_size (E), intermediate_size (F), num_layers (L), num_heads (H), num_kv_heads (K),
    head_dim (D): shapes. `head_dim` defaults to hidden_size // num_heads in presets and from_hf.
    max_position_embeddings: the model's context length (tokens).
    rope_theta, rope_scaling: rotary embedding base and scaling.
    rms_norm_eps: RMSNorm epsilon.
    qkv_bias: q/k/v projections carry a bias (Qwen2).
    tie_word_embeddings: the LM head reuses the embedding matrix.
    sliding_window: tokens each query sees (Mistral v0.1), or None for full causal attention.
    dtype: parameter and activation dtype, "float32" or "bfloat16" (norms and softmax accumulate in float32).
    bos_token_id, eos_token_id: special ids (eos may be a tuple).
  """
  family: Family
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  dtype: str = "float32"
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window!r}")

  @property
  def group_size(self) -> int:
    """Query heads per KV head (G)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Number of parameters (embedding counted once when tied)."""
    e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * e * f + 2 * e
    head = 0 if self.tie_word_embeddings else self.vocab_size * e
    return self.vocab_size * e + self.num_layers * layer + e + head

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike, dtype: str | None = None) -> "ModelConfig":
    """Builds a config from a Hugging Face config.json (a dict, or a path to the file or its directory).

    Args:
      config: the parsed config.json, or a path to it or to the checkpoint directory.
      dtype: parameter dtype; defaults to float32.

    Returns:
      The ModelConfig.

    Raises:
      ValueError: unsupported architecture or rope type, or a missing required field (named).
    """
    if not isinstance(config, Mapping):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return _from_hf_dict(config, dtype or "float32")

  def to_hf(self) -> dict[str, Any]:
    """The config.json (transformers 4.x dialect, which 5.x also reads) for this config."""
    arch = {v: k for k, v in _ARCHITECTURES.items()}[self.family]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": self.family.value,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": self.dtype,
    }
    rs = self.rope_scaling
    if rs.rope_type is RopeType.LLAMA3:
      out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                             "high_freq_factor": rs.high_freq_factor,
                             "original_max_position_embeddings": rs.original_max_position_embeddings}
    elif rs.rope_type is RopeType.LINEAR:
      out["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
    if self.family is Family.LLAMA:
      out["attention_bias"] = self.qkv_bias
      out["mlp_bias"] = False
    if self.family is Family.QWEN2:
      out["use_sliding_window"] = self.sliding_window is not None
      if self.sliding_window is not None:
        out["sliding_window"] = self.sliding_window
    if self.family is Family.MISTRAL:
      out["sliding_window"] = self.sliding_window
    if self.bos_token_id is not None:
      out["bos_token_id"] = self.bos_token_id
    if self.eos_token_id:
      out["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
    return out


def _require(config: Mapping[str, Any], key: str) -> Any:
  if key not in config or config[key] is None:
    raise ValueError(f"config.json is missing the required field {key!r}")
  return config[key]


def _family(config: Mapping[str, Any]) -> Family:
  archs = config.get("architectures") or []
  for arch in archs:
    if arch in _ARCHITECTURES:
      return _ARCHITECTURES[arch]
  model_type = config.get("model_type")
  for family in Family:
    if model_type == family.value:
      return family
  valid = ", ".join(sorted(_ARCHITECTURES))
  raise ValueError(f"unsupported architecture: architectures={archs!r}, model_type={model_type!r}; "
                   f"supported: {valid}")


def _rope(config: Mapping[str, Any]) -> tuple[float, RopeScaling]:
  params = config.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params and "rope_theta" not in params:
    params = params["full_attention"]  # Per-layer-type dialect of some 5.x configs.
  if isinstance(params, Mapping):  # transformers 5.x
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling: Mapping[str, Any] | None = params
  else:  # transformers 4.x
    theta = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
  if not scaling:
    return float(theta), RopeScaling()
  name = scaling.get("rope_type", scaling.get("type", "default"))
  try:
    rope_type = RopeType(name)
  except ValueError:
    valid = ", ".join(t.value for t in RopeType)
    raise ValueError(f"unsupported rope_type {name!r} in config.json; supported: {valid}") from None
  if rope_type is RopeType.DEFAULT:
    return float(theta), RopeScaling()
  if rope_type is RopeType.LINEAR:
    return float(theta), RopeScaling(rope_type, factor=float(_require(scaling, "factor")))
  return float(theta), RopeScaling(
      rope_type,
      factor=float(_require(scaling, "factor")),
      low_freq_factor=float(_require(scaling, "low_freq_factor")),
      high_freq_factor=float(_require(scaling, "high_freq_factor")),
      original_max_position_embeddings=int(_require(scaling, "original_max_position_embeddings")),
  )


def _from_hf_dict(config: Mapping[str, Any], dtype: str) -> ModelConfig:
  family = _family(config)
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"unsupported hidden_act {act!r} in config.json; supported: 'silu'")
  if config.get("mlp_bias"):
    raise ValueError("unsupported mlp_bias=True in config.json")
  hidden = int(_require(config, "hidden_size"))
  heads = int(_require(config, "num_attention_heads"))
  theta, scaling = _rope(config)
  if family is Family.QWEN2:
    qkv_bias = True
    window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
  elif family is Family.MISTRAL:
    qkv_bias = False
    window = config.get("sliding_window")
  else:
    if config.get("attention_bias"):  # Llama's flag also adds an o_proj bias, which pdopt does not implement.
      raise ValueError("unsupported attention_bias=True in a llama config.json")
    qkv_bias = False
    window = None
  eos = config.get("eos_token_id")
  eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
  return ModelConfig(
      family=family,
      vocab_size=int(_require(config, "vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(_require(config, "intermediate_size")),
      num_layers=int(_require(config, "num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      head_dim=int(config.get("head_dim") or hidden // heads),
      max_position_embeddings=int(_require(config, "max_position_embeddings")),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      qkv_bias=qkv_bias,
      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
      sliding_window=int(window) if window is not None else None,
      dtype=dtype,
      bos_token_id=config.get("bos_token_id"),
      eos_token_id=eos_ids,
  )


_LLAMA3_SCALING_32 = RopeScaling(RopeType.LLAMA3, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)
_LLAMA3_SCALING_8 = dataclasses.replace(_LLAMA3_SCALING_32, factor=8.0)

PRESETS: dict[str, ModelConfig] = {
    # A few-hundred-thousand-parameter model for tests and the CPU quickstart.
    "tiny": ModelConfig(family=Family.LLAMA, vocab_size=512, hidden_size=128, intermediate_size=344,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
                        rope_theta=10000.0, rms_norm_eps=1e-5, eos_token_id=(1,), bos_token_id=0),
    "llama-3.2-1b": ModelConfig(family=Family.LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING_32,
                                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                                eos_token_id=(128001,)),
    "llama-3.1-8b": ModelConfig(family=Family.LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING_8,
                                rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=(128001,)),
    "qwen2.5-0.5b": ModelConfig(family=Family.QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                qkv_bias=True, tie_word_embeddings=True, bos_token_id=151643,
                                eos_token_id=(151643,)),
    "mistral-7b": ModelConfig(family=Family.MISTRAL, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                              sliding_window=4096, bos_token_id=1, eos_token_id=(2,)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset, optionally with fields replaced (for example `dtype="bfloat16"`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
