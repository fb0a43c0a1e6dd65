"""pdopt: prefill/decode-aware LLM inference in JAX."""

from pdopt.engine.config import EngineConfig
from pdopt.engine.engine import Engine
from pdopt.engine.request import RequestOutput, SamplingParams
from pdopt.engine.speculative import SpeculativeConfig
from pdopt.models.config import ModelConfig, preset
from pdopt.models.hf import load_hf, save_hf
from pdopt.models.pretrained import load_pretrained
from pdopt.models.transformer import Transformer, init_model, logits

__all__ = ["Engine", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams", "SpeculativeConfig",
           "Transformer", "init_model", "load_hf", "load_pretrained", "logits", "preset", "save_hf"]
