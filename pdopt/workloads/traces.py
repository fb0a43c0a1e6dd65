"""Readers for request traces on disk: the Azure LLM inference format and length-only (arXiv / vidur) traces.

Both return plain numpy arrays, one entry per data row in file order; selecting, time scaling and clamping
happen in `pdopt.workloads.build`. No pandas: the csv module reads rows and numpy parses the timestamps.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).parents[2]
DEFAULT_TRACE_DIR = REPO_ROOT / "data/traces"
AZURE_CONV_TRACE = DEFAULT_TRACE_DIR / "azure_llm_2023_conv.csv"
ARXIV_LENGTHS_TRACE = DEFAULT_TRACE_DIR / "arxiv_summarization_lengths.csv"

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_LENGTHS_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")


@dataclasses.dataclass(frozen=True)
class Trace:
  """Rows of a trace file.

  Attributes:
    prompt_lens: [N] int64 prompt lengths in tokens.
    output_lens: [N] int64 output lengths in tokens.
    arrival_times: [N] float64 seconds relative to the first row's timestamp (Azure), or None (length-only).
    path: the file read.
  """
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  arrival_times: np.ndarray | None
  path: pathlib.Path

  def __len__(self) -> int:
    return len(self.prompt_lens)


def resolve_trace_path(path: str | pathlib.Path) -> pathlib.Path:
  """Finds a trace file: as given (absolute or relative to the working directory), else relative to the repo.

  Args:
    path: a file path.

  Returns:
    The existing file's path.

  Raises:
    ValueError: no such file.
  """
  p = pathlib.Path(path).expanduser()
  if p.is_file():
    return p
  if not p.is_absolute() and (REPO_ROOT / p).is_file():
    return REPO_ROOT / p
  raise ValueError(f"trace file not found: {str(path)!r} (also tried {str(REPO_ROOT / p)!r})")


def _read_columns(path: pathlib.Path, columns: tuple[str, ...]) -> list[list[str]]:
  """Reads the named columns of a csv file with a header row; returns one list of strings per column."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f"trace file {str(path)!r} is empty")
    header = [h.strip() for h in header]
    missing = [c for c in columns if c not in header]
    if missing:
      raise ValueError(f"trace file {str(path)!r} lacks columns {missing}; header is {header}, "
                       f"expected {list(columns)}")
    index = [header.index(c) for c in columns]
    out: list[list[str]] = [[] for _ in columns]
    for row in reader:
      if not row or all(not cell.strip() for cell in row):
        continue  # Blank lines (a trailing newline) carry no request.
      if len(row) != len(header):
        raise ValueError(f"malformed row at {path}:{reader.line_num}: {row!r} has {len(row)} fields, "
                         f"header has {len(header)}")
      for col, i in zip(out, index):
        col.append(row[i].strip())
  return out


def _parse_lengths(values: list[str], column: str, path: pathlib.Path) -> np.ndarray:
  """Parses a column of token counts, naming the first bad value."""
  try:
    out = np.array([float(v) for v in values], dtype=np.float64)
  except ValueError:
    for row, v in enumerate(values):
      try:
        float(v)
      except ValueError:
        raise ValueError(f"malformed {column} {v!r} in data row {row} of {path}") from None
    raise
  bad = np.flatnonzero(~np.isfinite(out) | (out < 0) | (out != np.round(out)))
  if bad.size:
    raise ValueError(f"malformed {column} {values[bad[0]]!r} in data row {bad[0]} of {path}: "
                     "expected a non-negative integer")
  return out.astype(np.int64)


def parse_azure_timestamps(values: list[str]) -> np.ndarray:
  """Parses Azure trace timestamps to seconds relative to the first one.

  Args:
    values: [N] strings like "2023-11-16 18:15:46.6805900" (any number of fractional digits, up to ns).

  Returns:
    [N] float64 seconds since values[0].

  Raises:
    ValueError: a timestamp that does not parse, named.
  """
  if not values:
    return np.zeros((0,), np.float64)
  try:
    stamps = np.array(values, dtype="datetime64[ns]")
  except ValueError:
    for v in values:
      try:
        np.datetime64(v, "ns")
      except ValueError:
        raise ValueError(f"malformed TIMESTAMP {v!r}: expected 'YYYY-MM-DD HH:MM:SS.fffffff'") from None
    raise
  if np.isnat(stamps).any():
    raise ValueError(f"malformed TIMESTAMP {values[int(np.flatnonzero(np.isnat(stamps))[0])]!r}")
  return (stamps - stamps[0]) / np.timedelta64(1, "s")


def load_azure_trace(path: str | pathlib.Path = AZURE_CONV_TRACE) -> Trace:
  """Reads an Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`).

  Args:
    path: the csv file; defaults to the conversation trace in `data/traces/`.

  Returns:
    The trace, arrival times in seconds relative to the first row, in file order.

  Raises:
    ValueError: a missing file, a missing column, or a malformed row (named).
  """
  p = resolve_trace_path(path)
  stamps, prompts, outputs = _read_columns(p, _AZURE_COLUMNS)
  return Trace(prompt_lens=_parse_lengths(prompts, "ContextTokens", p),
               output_lens=_parse_lengths(outputs, "GeneratedTokens", p),
               arrival_times=parse_azure_timestamps(stamps), path=p)


def load_lengths_trace(path: str | pathlib.Path = ARXIV_LENGTHS_TRACE) -> Trace:
  """Reads a length-only trace (`num_prefill_tokens,num_decode_tokens,...`, the vidur format).

  Args:
    path: the csv file; defaults to the arXiv summarization lengths in `data/traces/`.

  Returns:
    The trace with `arrival_times=None`.

  Raises:
    ValueError: a missing file, a missing column, or a malformed row (named).
  """
  p = resolve_trace_path(path)
  prompts, outputs = _read_columns(p, _LENGTHS_COLUMNS)
  return Trace(prompt_lens=_parse_lengths(prompts, "num_prefill_tokens", p),
               output_lens=_parse_lengths(outputs, "num_decode_tokens", p), arrival_times=None, path=p)
