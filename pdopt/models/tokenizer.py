"""The byte-level tokenizer of pdopt's shipped models: one token per UTF-8 byte, plus special ids.

Ids 0-255 are the bytes themselves, 256 is BOS (start of a document), 257 is EOS (end of a document) and
258-263 are reserved, so the vocabulary is 264 (a multiple of 8). Nothing is learned, so the tokenizer ships
no file and round-trips any byte string exactly; decoding text with invalid UTF-8 (a completion cut inside a
multi-byte character) replaces the broken bytes with U+FFFD.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

NUM_BYTES = 256
BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 264


class ByteTokenizer:
  """UTF-8 bytes as token ids. Stateless; `ByteTokenizer()` instances are interchangeable."""

  vocab_size = VOCAB_SIZE
  bos_id = BOS_ID
  eos_id = EOS_ID

  def encode(self, text: str | bytes, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (a str is UTF-8 encoded first), optionally framed by BOS/EOS."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = list(data)
    if add_bos:
      ids.insert(0, BOS_ID)
    if add_eos:
      ids.append(EOS_ID)
    return ids

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """The bytes of `ids`; special and reserved ids are dropped.

    Raises:
      ValueError: an id outside [0, VOCAB_SIZE).
    """
    arr = np.asarray(list(ids), dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
      bad = int(arr[(arr < 0) | (arr >= VOCAB_SIZE)][0])
      raise ValueError(f"token id {bad} is outside the byte vocabulary [0, {VOCAB_SIZE})")
    return arr[arr < NUM_BYTES].astype(np.uint8).tobytes()

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` (UTF-8, invalid sequences replaced by U+FFFD); special ids are dropped."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")
