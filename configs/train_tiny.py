"""Trains the target/draft pair that ships with pdopt (`tiny-code`, `tiny-code-draft`).

  python -m experiments.train_tiny --config=configs/train_tiny.py                       # GPU: minutes
  python -m experiments.train_tiny --config=configs/train_tiny.py --config.cpu_small=True  # CPU: the shipped run

Both models share the byte tokenizer (`pdopt/models/tokenizer.py`, vocab 264) and read the Python stdlib
corpus (`pdopt/training/data.py`) without the files matching `exclude`. `cpu_small` replaces each model's
steps, batch and sequence length by its `cpu_small` entry: the shipped checkpoints were trained that way, under
`nice -n 19` on two shared CPU cores (Python 3.11): the target takes 1200 steps of 16 x 256 tokens (4.9M
tokens, about half an epoch; ~40 minutes on two idle cores, ~2 s per step), the draft a few minutes; each
manifest.json records its run (steps, losses, seconds).
Checkpoints go to `out_dir/<checkpoint_name>/` (model_config.json, params/, manifest.json); loss curves and
summaries to `run_dir/<model>/`. Set `out_dir=''` to train without replacing the shipped checkpoints.
"""

import ml_collections


def _model(**kw) -> ml_collections.ConfigDict:
  base = dict(num_heads=4, num_kv_heads=2, max_position_embeddings=1024, seed=0, learning_rate=3e-3,
              warmup_steps=200, weight_decay=0.1, grad_clip=1.0, steps=4000, batch_size=32, seq_len=512)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def get_config():
  config = ml_collections.ConfigDict()
  config.train = "target,draft"  # which models to train, comma-separated
  config.cpu_small = False
  config.out_dir = "pdopt/pretrained"
  config.run_dir = "results/train_tiny"
  config.corpus_root = ""  # a copy of some Python's stdlib (dir named pythonX.Y); empty: this interpreter's
  config.holdout_every = 20  # one stdlib file in ~20 is held out (by path hash)
  # Comma-separated globs of stdlib paths to skip: codec tables (mostly hex literals) and pydoc's prose topics.
  config.exclude = "encodings/*,pydoc_data/*"
  config.eval_windows = 32  # held-out windows of seq_len tokens
  config.eval_every = 100
  config.log_every = 10
  # Held-out windows re-scored through pdopt.logits to check the dense training forward (0: skip; the tests
  # check it too).
  config.verify_windows = 4
  config.models = ml_collections.ConfigDict()
  # ~5.3M parameters.
  config.models.target = _model(checkpoint_name="tiny-code", hidden_size=256, intermediate_size=864,
                                num_layers=6, cpu_small=dict(steps=1200, batch_size=16, seq_len=256))
  # ~0.46M parameters (< 1/8 of the target).
  config.models.draft = _model(checkpoint_name="tiny-code-draft", hidden_size=128, intermediate_size=384,
                               num_layers=2, cpu_small=dict(steps=1200, batch_size=16, seq_len=256))
  return config
