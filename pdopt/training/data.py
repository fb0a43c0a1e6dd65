"""The training corpus: Python source files of the standard library of the running interpreter.

It is present on every machine without a download. Files are listed in sorted order of their path relative
to the stdlib root (test suites, `site-packages` and `__pycache__` excluded, and whatever matches the
caller's `exclude` globs: the shipped models skip `encodings/*`, whose codec tables are mostly hex literals,
and `pydoc_data/*`, which is prose) and a file is held out for
evaluation when the sha256 of its relative path falls in `1 / holdout_every` of the hash space, so adding or
removing other files (a different Python version) does not move files between the splits. Each file becomes
`BOS bytes EOS`; the files of a split are concatenated into one token stream, from which training samples
random windows and evaluation reads fixed, non-overlapping windows.

The stdlib differs between Python versions; `Corpus.manifest()` records the exact file lists and a sha256 of
each split's token stream so a run can tell whether it saw the same text as the shipped checkpoints.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
import pathlib
import sys
import sysconfig

import numpy as np

from pdopt.models import tokenizer as tok

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> pathlib.Path:
  """The directory of the running interpreter's Python standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_files(root: pathlib.Path, exclude: tuple[str, ...] = ()) -> list[str]:
  """Sorted relative paths (POSIX) of the `.py` files under `root`, test suites and packages excluded.

  Args:
    root: the stdlib directory.
    exclude: `fnmatch` globs of relative paths to leave out as well ("encodings/*").

  Returns:
    The relative paths.
  """
  out = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if _EXCLUDED_DIRS & set(rel.parts[:-1]) or not path.is_file():
      continue
    if any(fnmatch.fnmatchcase(rel.as_posix(), pattern) for pattern in exclude):
      continue
    out.append(rel.as_posix())
  return sorted(out)


def is_heldout(rel_path: str, holdout_every: int) -> bool:
  """Whether a file belongs to the evaluation split (decided by the hash of its path alone)."""
  digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % holdout_every == 0


def token_stream(root: pathlib.Path, files: list[str]) -> np.ndarray:
  """`BOS bytes EOS` of every file, concatenated: [N] uint16 token ids."""
  parts = []
  for rel in files:
    data = np.frombuffer((root / rel).read_bytes(), dtype=np.uint8).astype(np.uint16)
    parts += [np.array([tok.BOS_ID], np.uint16), data, np.array([tok.EOS_ID], np.uint16)]
  return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _python_version(root: pathlib.Path) -> str:
  """The Python version of a stdlib directory: the running one for its own stdlib, else from the name."""
  if root.resolve() == stdlib_root().resolve():
    return sys.version.split()[0]
  match = re.fullmatch(r"python(\d+\.\d+)", root.name)
  return match.group(1) if match else "unknown"


def stream_sha256(tokens: np.ndarray) -> str:
  """sha256 (hex) of a token stream stored as little-endian uint16."""
  return hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and held-out token streams of the stdlib corpus.

  Attributes:
    root: the stdlib directory read.
    train_files, eval_files: relative paths of each split, sorted.
    train_tokens, eval_tokens: [N] uint16 token streams.
    holdout_every: one file in about this many is held out.
    exclude: the globs of relative paths left out (besides test suites and packages).
  """
  root: pathlib.Path
  train_files: list[str]
  eval_files: list[str]
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  holdout_every: int
  exclude: tuple[str, ...] = ()

  def manifest(self) -> dict:
    """JSON-ready description: Python version, file lists, sizes (tokens) and sha256 of each stream."""
    return {
        "source": "Python standard library .py files (test suites, site-packages excluded)",
        "python_version": _python_version(self.root),
        "stdlib_root": str(self.root),
        "holdout_rule": f"sha256(relative path) as a big-endian 64-bit int of its first 8 bytes "
                        f"% {self.holdout_every} == 0",
        "holdout_every": self.holdout_every,
        "exclude": list(self.exclude),
        "train_num_files": len(self.train_files),
        "eval_num_files": len(self.eval_files),
        "train_num_tokens": int(self.train_tokens.size),
        "eval_num_tokens": int(self.eval_tokens.size),
        "train_sha256": stream_sha256(self.train_tokens),
        "eval_sha256": stream_sha256(self.eval_tokens),
        "train_files": self.train_files,
        "eval_files": self.eval_files,
    }


def load_corpus(holdout_every: int = 20, root: pathlib.Path | None = None,
                exclude: tuple[str, ...] = ()) -> Corpus:
  """Reads the corpus from `root` (default: this interpreter's stdlib).

  Args:
    holdout_every: hold out about one file in this many for evaluation.
    root: the directory to read (a copy of some Python's stdlib, named `pythonX.Y`); None or empty: this
      interpreter's stdlib.
    exclude: `fnmatch` globs of relative paths to leave out ("encodings/*"); the split of the others does not
      change (it depends on each file's own path).

  Returns:
    The Corpus.
  """
  root = pathlib.Path(root) if root else stdlib_root()
  exclude = tuple(exclude)
  files = list_files(root, exclude)
  eval_files = [f for f in files if is_heldout(f, holdout_every)]
  train_files = [f for f in files if not is_heldout(f, holdout_every)]
  return Corpus(root, train_files, eval_files, token_stream(root, train_files), token_stream(root, eval_files),
                holdout_every, exclude)


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
  """Random windows of the stream: [B, seq_len + 1] int32 (inputs are [:, :-1], targets [:, 1:])."""
  starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size)
  return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, num_windows: int) -> np.ndarray:
  """Non-overlapping windows spread evenly over the stream: [num_windows, seq_len + 1] int32."""
  max_windows = (tokens.size - 1) // seq_len
  if num_windows > max_windows:
    raise ValueError(f"num_windows={num_windows} exceeds the {max_windows} windows of {seq_len} tokens "
                     f"in the held-out stream")
  stride = max_windows // num_windows
  starts = np.arange(num_windows) * stride * seq_len
  return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
