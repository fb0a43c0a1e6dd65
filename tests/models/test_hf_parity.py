"""Logit and greedy-token parity with Hugging Face `transformers` (torch CPU, float32)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import pdopt

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _hf_model(family: str):
  # A wider init than HF's 0.02 spreads the logits, so greedy picks are not near-ties that float32
  # rounding differences between two frameworks could flip.
  common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                attn_implementation="eager", initializer_range=0.1)
  if family == "llama":
    # GQA, an explicit head_dim that differs from hidden_size / heads, and Llama 3 RoPE scaling.
    cfg = transformers.LlamaConfig(head_dim=16, rope_theta=500000.0, tie_word_embeddings=False,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                   **common)
    return transformers.LlamaForCausalLM(cfg)
  if family == "qwen2":
    cfg = transformers.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                                   **common)
    return transformers.Qwen2ForCausalLM(cfg)
  # A short window so the parity sequences cross it.
  cfg = transformers.MistralConfig(sliding_window=24, tie_word_embeddings=False, **common)
  return transformers.MistralForCausalLM(cfg)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def pair(request, tmp_path_factory):
  torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3}[request.param])  # hash() of a str varies by process
  hf = _hf_model(request.param).eval()
  with torch.no_grad():  # Non-trivial biases and norm weights, so a dropped term would show.
    for name, p in hf.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return request.param, hf, pdopt.load_hf(path, dtype="float32")


def test_logits_match(pair):
  family, hf, model = pair
  rng = np.random.default_rng(1)
  for length in (1, 7, 50):
    ids = rng.integers(0, 256, size=length)
    with torch.no_grad():
      ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    out = pdopt.logits(model, ids)
    assert out.shape == ref.shape and out.dtype == np.float32
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, f"{family} length {length}: relative error {err}"


def test_greedy_tokens_match(pair):
  family, hf, model = pair
  prompt = np.random.default_rng(2).integers(0, 256, size=9)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt)[None], max_new_tokens=32, do_sample=False, min_new_tokens=32,
                      pad_token_id=0)[0, len(prompt):].tolist()
  ids = list(prompt)
  for _ in range(32):
    ids.append(int(np.argmax(pdopt.logits(model, ids)[-1])))
  assert ids[len(prompt):] == ref, family


def test_save_hf_round_trip_loads_in_transformers(pair, tmp_path):
  family, hf, model = pair
  pdopt.save_hf(model, tmp_path, max_shard_bytes=60_000)  # Several shards plus an index.
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  ids = torch.tensor(np.random.default_rng(3).integers(0, 256, size=20))[None]
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(ids).logits.numpy(), hf(ids).logits.numpy(), rtol=0, atol=1e-5)
  again = pdopt.load_hf(tmp_path)
  np.testing.assert_array_equal(pdopt.logits(again, [3, 4, 5]), pdopt.logits(model, [3, 4, 5]))


@pytest.mark.parametrize("fixture,name", [("llama-3.2-1b", "llama-3.2-1b"), ("qwen2.5-0.5b", "qwen2.5-0.5b"),
                                          ("mistral-7b", "mistral-7b")])
def test_published_configs_match_presets(fixture, name):
  config = pdopt.ModelConfig.from_hf(os.path.join(FIXTURES, f"{fixture}.config.json"))
  assert config == pdopt.preset(name)


def test_rope_parameters_dialect_matches_rope_scaling_dialect():
  with open(os.path.join(FIXTURES, "llama-3.2-1b.config.json")) as f:
    v4 = json.load(f)
  v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=v4["rope_theta"])
  assert pdopt.ModelConfig.from_hf(v5) == pdopt.ModelConfig.from_hf(v4)


def test_unsupported_architecture_is_named():
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    pdopt.ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_unsupported_rope_type_is_named():
  cfg = json.load(open(os.path.join(FIXTURES, "llama-3.2-1b.config.json")))
  cfg["rope_scaling"]["rope_type"] = "yarn"
  with pytest.raises(ValueError, match="yarn"):
    pdopt.ModelConfig.from_hf(cfg)


def test_missing_field_is_named():
  cfg = json.load(open(os.path.join(FIXTURES, "mistral-7b.config.json")))
  del cfg["hidden_size"]
  with pytest.raises(ValueError, match="hidden_size"):
    pdopt.ModelConfig.from_hf(cfg)


def _tiny_checkpoint(tmp_path):
  model = pdopt.init_model(pdopt.preset("tiny"), seed=0)
  pdopt.save_hf(model, tmp_path)
  return tmp_path


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = _tiny_checkpoint(tmp_path)
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    pdopt.load_hf(path)


def test_shape_mismatch_is_named(tmp_path):
  path = _tiny_checkpoint(tmp_path)
  cfg = json.load(open(path / "config.json"))
  cfg["intermediate_size"] += 8
  json.dump(cfg, open(path / "config.json", "w"))
  with pytest.raises(ValueError, match=r"gate_proj\.weight.*shape"):
    pdopt.load_hf(path)


def test_missing_weights_is_an_error(tmp_path):
  path = _tiny_checkpoint(tmp_path)
  os.remove(path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    pdopt.load_hf(path)


def test_bfloat16_load_is_close_to_float32(pair, tmp_path):
  family, hf, model = pair
  pdopt.save_hf(model, tmp_path)
  bf16 = pdopt.load_hf(tmp_path, dtype="bfloat16")
  assert str(bf16.embed[...].dtype) == "bfloat16"
  ids = np.arange(30) % 256
  a, b = pdopt.logits(model, ids), pdopt.logits(bf16, ids)
  assert np.abs(a - b).max() / np.abs(a).max() < 5e-2, family
