"""The shipped byte-level models, their tokenizer and the training loop."""

import math
import warnings

import numpy as np
import pytest

import pdopt
from pdopt.models import pretrained, tokenizer as tok
from pdopt.models.config import Family, ModelConfig
from pdopt.training import data, train


@pytest.fixture(scope="module")
def target():
  return pretrained.load_pretrained("tiny-code")


def test_load_both_and_draft_is_at_most_an_eighth(target):
  draft = pretrained.load_pretrained("tiny-code-draft")
  assert isinstance(target, pdopt.Transformer) and isinstance(draft, pdopt.Transformer)
  for model, name in ((target, "tiny-code"), (draft, "tiny-code-draft")):
    assert model.config.vocab_size == tok.VOCAB_SIZE
    assert model.config.bos_token_id == tok.BOS_ID and model.config.eos_token_id == (tok.EOS_ID,)
    assert model.config.num_params() == pretrained.manifest(name)["num_params"]
  assert 5_000_000 <= target.config.num_params() <= 20_000_000
  assert draft.config.num_params() * 8 <= target.config.num_params()
  logits = pdopt.logits(draft, tok.ByteTokenizer().encode("import os\n", add_bos=True))
  assert logits.shape == (11, tok.VOCAB_SIZE) and np.isfinite(logits).all()


def test_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match="tiny-code-draft"):
    pretrained.load_pretrained("tiny-cod")
  with pytest.raises(ValueError, match="tiny-code"):
    pretrained.tokenizer("gpt2")


def test_heldout_loss_matches_manifest(target):
  m = pretrained.manifest("tiny-code")
  corpus = m["corpus"]
  root = data.stdlib_root()
  files = [f for f in corpus["eval_files"] if (root / f).is_file()]
  stream = data.token_stream(root, files)
  if data.stream_sha256(stream) != corpus["eval_sha256"]:
    warnings.warn(f"held-out stdlib files differ from the manifest's (Python {corpus['python_version']})")
  ev = m["eval"]
  windows = data.eval_windows(stream, ev["seq_len"], ev["windows"])
  loss = train.dense_eval_loss(target, windows)
  assert abs(loss - ev["loss"]) <= 0.05 * ev["loss"], (loss, ev["loss"])
  assert loss < 0.6 * math.log(tok.VOCAB_SIZE)
  # The serving forward (pdopt.logits) scores held-out text as the training forward does.
  ragged = train.ragged_eval_loss(target, windows[:2])
  dense = train.dense_eval_loss(target, windows[:2])
  np.testing.assert_allclose(ragged, dense, rtol=1e-4)


@pytest.mark.parametrize("text", ["", "def f(x):\n  return x\n", "héllo wörld ✓ 😀 中文", "\x00\xff\n\t"])
def test_tokenizer_round_trips_text(text):
  t = tok.ByteTokenizer()
  ids = t.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.BOS_ID and ids[-1] == tok.EOS_ID and len(ids) == len(text.encode()) + 2
  assert t.decode(ids) == text


def test_tokenizer_round_trips_random_bytes():
  t = tok.ByteTokenizer()
  raw = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
  assert t.decode_bytes(t.encode(raw)) == raw
  assert pretrained.tokenizer("tiny-code").decode_bytes(t.encode(raw)) == raw
  with pytest.raises(ValueError, match="300"):
    t.decode([65, 300])


def test_three_steps_decrease_loss_on_a_fixed_batch():
  config = ModelConfig(family=Family.LLAMA, vocab_size=tok.VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
  model = pdopt.init_model(config, seed=0)
  batch = data.sample_batch(np.arange(4000, dtype=np.uint16) % 256, 2, 16, np.random.default_rng(0))
  opt = train.make_optimizer(train.ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=1, weight_decay=0.0, grad_clip=1.0)), steps=3)
  trainer = train.Trainer(model, opt)
  before = trainer.loss(batch)
  losses = [trainer.step(batch) for _ in range(3)]
  after = trainer.loss(batch)
  assert losses[0] == pytest.approx(before, rel=1e-5)
  assert after < before - 0.05, (before, losses, after)
  # The trained state is the Transformer's: pdopt.logits serves it.
  trained = trainer.sync()
  np.testing.assert_allclose(train.ragged_eval_loss(trained, batch[:1]), train.dense_eval_loss(trained, batch[:1]),
                             rtol=1e-5)


def test_corpus_exclude_leaves_out_only_the_matching_files():
  root = data.stdlib_root()
  everything = data.list_files(root)
  kept = data.list_files(root, exclude=("encodings/*", "pydoc_data/*"))
  assert kept == [f for f in everything if not f.startswith(("encodings/", "pydoc_data/"))]
  # The shipped models were trained without them, and their manifest says so.
  assert pretrained.manifest("tiny-code")["corpus"]["exclude"] == ["encodings/*", "pydoc_data/*"]
