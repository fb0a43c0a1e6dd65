"""Models that ship with pdopt, loaded by name.

`tiny-code` (~5.3M parameters) and `tiny-code-draft` (~0.46M, under 1/8 of the target) are byte-level
Llama-family models trained by `python -m experiments.train_tiny` on Python standard-library source (see
each checkpoint's manifest.json for the corpus hash, file lists, steps and held-out loss). They share the
byte tokenizer of `pdopt.models.tokenizer`, and are meant as a real target/draft pair for speculative
decoding and quantization experiments, not as useful code models. Parameters are stored in bfloat16 and
restored as float32.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from pdopt.models import checkpoints
from pdopt.models.tokenizer import ByteTokenizer
from pdopt.models.transformer import Transformer

_ROOT = pathlib.Path(__file__).resolve().parent.parent / "pretrained"

# Name -> checkpoint directory under pdopt/pretrained/.
REGISTRY: dict[str, str] = {
    "tiny-code": "tiny-code",
    "tiny-code-draft": "tiny-code-draft",
}


def checkpoint_dir(name: str) -> pathlib.Path:
  """The directory of a shipped checkpoint.

  Raises:
    ValueError: `name` is not a shipped model (the valid names are listed).
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown pretrained model {name!r}; valid: {', '.join(sorted(REGISTRY))}")
  return _ROOT / REGISTRY[name]


def load_pretrained(name: str, dtype: str | None = None) -> Transformer:
  """Restores a model that ships with pdopt.

  Args:
    name: one of `REGISTRY` ("tiny-code", "tiny-code-draft").
    dtype: parameter/activation dtype; None keeps float32.

  Returns:
    The Transformer.

  Raises:
    ValueError: unknown name.
  """
  return checkpoints.restore(checkpoint_dir(name), dtype=dtype)


def tokenizer(name: str) -> ByteTokenizer:
  """The tokenizer of a shipped model (all of them use the byte tokenizer)."""
  checkpoint_dir(name)
  return ByteTokenizer()


def manifest(name: str) -> dict[str, Any]:
  """The training manifest of a shipped model: corpus files and hash, steps, losses."""
  with open(checkpoint_dir(name) / "manifest.json", encoding="utf-8") as f:
    return json.load(f)
