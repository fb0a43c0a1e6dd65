"""What a quantized KV cache costs in model quality: logit error and held-out perplexity.

Every position is computed through `pdopt.logits(..., kv_quant=...)`, i.e. with K/V quantized on write and
dequantized in attention exactly as a quantized engine cache does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pdopt.models.transformer import Transformer, logits


@dataclasses.dataclass(frozen=True)
class KVQuantQuality:
  """Quality of one KV cache format over a set of windows.

  Attributes:
    kv_quant: "none", "int8" or "fp8".
    loss: mean next-token loss (nats per token).
    perplexity: exp(loss).
    max_rel_logit_diff: max |logits - logits_unquantized| / max |logits_unquantized| over all positions.
    argmax_agreement: fraction of positions whose argmax equals the unquantized one.
  """
  kv_quant: str
  loss: float
  perplexity: float
  max_rel_logit_diff: float
  argmax_agreement: float


def _loss(lg: np.ndarray, targets: np.ndarray) -> float:
  lg = lg - lg.max(-1, keepdims=True)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(targets)), targets].mean())


def kv_quant_quality(model: Transformer, windows: np.ndarray,
                     kinds: Sequence[str | None] = (None, "int8", "fp8")) -> list[KVQuantQuality]:
  """Evaluates each KV format on `windows` `[N, L + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`)."""
  base = [logits(model, w[:-1]) for w in windows]
  out = []
  for kind in kinds:
    lgs = base if kind is None else [logits(model, w[:-1], kv_quant=kind) for w in windows]
    loss = float(np.mean([_loss(lg, w[1:]) for lg, w in zip(lgs, windows)]))
    diff = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(lgs, base))
    agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(lgs, base)])))
    out.append(KVQuantQuality(kind or "none", loss, math.exp(loss), diff, agree))
  return out
