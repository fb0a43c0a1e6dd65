"""`ModelSource`: which model to serve, as plain data that another process can rebuild it from."""

from __future__ import annotations

import dataclasses
import pathlib

from pdopt.models import checkpoints, hf, pretrained
from pdopt.models.config import ModelConfig, preset
from pdopt.models.transformer import Transformer, init_model


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model by where it comes from.

  Attributes:
    name: a shipped model (`pretrained.REGISTRY`, e.g. "tiny-code") or a `pdopt.preset` name (random weights
      from `seed`); ignored when `hf_dir` is set.
    hf_dir: a Hugging Face checkpoint directory, or "".
    dtype: parameter dtype.
    seed: the random weights' seed of a preset.
  """
  name: str = "tiny"
  hf_dir: str = ""
  dtype: str = "float32"
  seed: int = 0

  def build(self) -> Transformer:
    """The model with its weights."""
    if self.hf_dir:
      return hf.load_hf(self.hf_dir, dtype=self.dtype)
    if self.name in pretrained.REGISTRY:
      return pretrained.load_pretrained(self.name, dtype=self.dtype)
    return init_model(preset(self.name, dtype=self.dtype), seed=self.seed)

  def config(self) -> ModelConfig:
    """The model's shape without its weights."""
    if self.hf_dir:
      return ModelConfig.from_hf(pathlib.Path(self.hf_dir) / "config.json", dtype=self.dtype)
    if self.name in pretrained.REGISTRY:
      return checkpoints.load_config(pretrained.checkpoint_dir(self.name)).replace(dtype=self.dtype)
    return preset(self.name, dtype=self.dtype)
