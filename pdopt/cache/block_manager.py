"""Host-side KV page allocator: reference counts and automatic prefix caching.

The continuous-batching engine owns one `BlockManager` per KV pool. It never
touches device memory: it only decides which page ids (ints in
`[0, num_pages)`) each request's tokens live in. Token `t` of a request lives in
page `page_table(request_id)[t // page_size]` at slot `t % page_size`.

Every page is in exactly one of three states:

* free: refcount 0, no key; in the free pool.
* cached (evictable): refcount 0, carries a prefix key; in an LRU, so a later
  request with the same prefix can reuse its KV without recomputing it.
* used: refcount > 0, referenced by the page tables of one or more requests
  (with or without a key).

Prefix caching. A full page (`page_size` tokens whose KV has been computed) is
keyed by `page_key(previous page's key, its token ids)`, a SHA-256 chain, so a
key names the whole prefix up to and including that page and is the same in
every process. `match_prefix` walks the chain for a new request and takes a
reference on each cached page it finds; `commit` registers newly full pages
after a step. Two requests with the same prompt prefix therefore share the
same physical pages (refcount 2), which is safe because a full page is never
written again.

Life of a request, as the engine drives it::

  cached = bm.match_prefix(rid, prompt, keys)  # on (re)scheduling, no pages yet
  if not bm.allocate(rid, cached + chunk): ... # pages for the tokens to compute
  ... run the step ...
  bm.commit(rid, all_token_ids, num_computed)  # register newly full pages
  bm.free(rid)                                 # finish / abort / preemption

Eviction order: when `allocate` runs out of free pages it reuses the
least-recently-released cached page. `free` releases a request's pages last to
first, so the tail of a sequence (least likely to be shared) is evicted before
its head.

All operations are O(1) per page touched; `match_prefix` is O(matched pages).
A caller that already has the keys of a sequence's first pages (a prompt submitted
again: `page_keys` of it does not change) hands them to `match_prefix` or `commit`,
and those pages are not hashed again.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import struct
from typing import Sequence

# The key of the (virtual) page before the first one.
_ROOT_KEY = b""


def page_key(prev_key: bytes | None, token_ids: Sequence[int]) -> bytes:
  """Returns the prefix-cache key of one full page.

  Deterministic across processes and machines (SHA-256 over little-endian
  int64 token ids), unlike Python's randomized `hash`.

  Args:
    prev_key: key of the previous page of the sequence, or None (or b"") for
      the first page.
    token_ids: the page's token ids, exactly `page_size` of them.

  Returns:
    A 32-byte digest naming the whole prefix that ends with this page.
  """
  return _digest(prev_key or _ROOT_KEY, _int64s(len(token_ids)).pack(*token_ids))


def page_keys(prev_key: bytes | None, token_ids: Sequence[int], page_size: int) -> list[bytes]:
  """Returns the prefix-cache keys of consecutive full pages: `page_key` of each page in turn, the tokens packed
  once for all of them (a prompt chunk fills dozens of pages at once).

  Args:
    prev_key: key of the page before the first one, or None (or b"") for a sequence's first page.
    token_ids: the pages' token ids; a trailing partial page gets no key.
    page_size: tokens per page.

  Returns:
    One 32-byte digest per full page, in order.
  """
  num_pages = len(token_ids) // page_size
  width = 8 * page_size  # Bytes of one page's tokens.
  data = memoryview(_int64s(num_pages * page_size).pack(*token_ids[:num_pages * page_size]))
  keys, key = [], prev_key or _ROOT_KEY
  for start in range(0, num_pages * width, width):
    key = _digest(key, data[start:start + width])
    keys.append(key)
  return keys


def _digest(prev_key: bytes, packed: bytes | memoryview) -> bytes:
  """SHA-256 of the previous page's key followed by a page's packed token ids."""
  h = hashlib.sha256(prev_key)
  h.update(packed)
  return h.digest()


@functools.cache
def _int64s(n: int) -> struct.Struct:
  """The little-endian packing of n int64s, compiled once per page size."""
  return struct.Struct(f"<{n}q")


@dataclasses.dataclass(frozen=True)
class BlockStats:
  """A snapshot of page accounting and prefix-cache counters.

  Attributes:
    num_pages: total pages in the pool.
    free: pages in the free pool (refcount 0, no key).
    cached: evictable cached pages (refcount 0, with a key).
    used: pages referenced by at least one request (refcount > 0).
    num_requests: requests that currently hold a page table (possibly empty).
    prefix_queries: tokens looked up by `match_prefix` since construction.
    prefix_hits: of those, tokens found in the prefix cache.
    evictions: cached pages reclaimed by `allocate` since construction.
  """

  num_pages: int
  free: int
  cached: int
  used: int
  num_requests: int
  prefix_queries: int
  prefix_hits: int
  evictions: int

  @property
  def allocatable(self) -> int:
    """Pages `allocate` can take now: free + cached."""
    return self.free + self.cached

  @property
  def hit_rate(self) -> float:
    """Prefix-cache hit rate in tokens (0.0 when nothing was queried)."""
    if not self.prefix_queries:
      return 0.0
    return self.prefix_hits / self.prefix_queries


@dataclasses.dataclass
class _RequestPages:
  """Per-request state: its page table and the key chain of its full pages.

  `keys[i]` is the prefix key of page `pages[i]`'s content for every page whose
  KV is known to be complete (matched or committed). The page itself may not
  carry that key (a duplicate of a page cached elsewhere stays private), but
  the chain is needed to key the pages that follow it.
  """

  pages: list[int] = dataclasses.field(default_factory=list)
  keys: list[bytes] = dataclasses.field(default_factory=list)
  # Keys of the sequence's first pages that the caller had (`match_prefix` and `commit`'s `keys`).
  known: Sequence[bytes] = ()


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


class BlockManager:
  """Allocates KV pages to requests, shares and caches full prefix pages.

  Not thread-safe: one engine thread drives it.
  """

  def __init__(self, num_pages: int, page_size: int,
               enable_prefix_caching: bool = True):
    """Creates a pool with every page free.

    Args:
      num_pages: pages in the pool (>= 1).
      page_size: tokens per page (>= 1).
      enable_prefix_caching: if False, `match_prefix` always returns 0,
        `commit` registers nothing and freed pages go straight to the free pool.

    Raises:
      ValueError: naming the bad field and its value.
    """
    _check_positive_int("num_pages", num_pages)
    _check_positive_int("page_size", page_size)
    if not isinstance(enable_prefix_caching, bool):
      raise ValueError("enable_prefix_caching must be a bool, got "
                       f"{enable_prefix_caching!r}")
    self._num_pages = num_pages
    self._page_size = page_size
    self._enable_prefix_caching = enable_prefix_caching
    self._refcount = [0] * num_pages
    self._free: collections.deque[int] = collections.deque(range(num_pages))
    # Evictable cached pages, least recently released first.
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    self._key_to_page: dict[bytes, int] = {}
    self._page_to_key: dict[int, bytes] = {}
    self._requests: dict[str, _RequestPages] = {}
    self._prefix_queries = 0
    self._prefix_hits = 0
    self._evictions = 0

  # ---------------------------------------------------------------- properties

  @property
  def num_pages(self) -> int:
    """Total pages in the pool."""
    return self._num_pages

  @property
  def page_size(self) -> int:
    """Tokens per page."""
    return self._page_size

  @property
  def enable_prefix_caching(self) -> bool:
    """Whether full pages are cached and shared by prefix."""
    return self._enable_prefix_caching

  @property
  def max_tokens_capacity(self) -> int:
    """Most tokens one request can ever hold (num_pages * page_size).

    A request whose prompt plus max_tokens exceeds this can never run and
    should be rejected with a reason rather than left waiting.
    """
    return self._num_pages * self._page_size

  @property
  def num_free_pages(self) -> int:
    """Pages allocatable now: the free pool plus evictable cached pages."""
    return len(self._free) + len(self._lru)

  # ----------------------------------------------------------------- queries

  def has_request(self, request_id: str) -> bool:
    """Whether the request currently holds a (possibly empty) page table."""
    return request_id in self._requests

  def ref_count(self, page: int) -> int:
    """Returns how many requests reference page (0: free or cached)."""
    return self._refcount[page]

  def page_table(self, request_id: str) -> list[int]:
    """Returns a copy of the request's page table ([] for an unknown id)."""
    req = self._requests.get(request_id)
    return list(req.pages) if req is not None else []

  def num_pages_held(self, request_id: str) -> int:
    """How many pages the request's table holds (0 for an unknown id)."""
    req = self._requests.get(request_id)
    return len(req.pages) if req is not None else 0

  def pages_held(self, request_ids: Sequence[str]) -> list[int]:
    """`num_pages_held` of each request."""
    requests = self._requests
    return [len(requests[r].pages) if r in requests else 0 for r in request_ids]

  def num_pages_needed(self, request_id: str, num_tokens: int) -> int:
    """Extra pages `allocate(request_id, num_tokens)` would take.

    Args:
      request_id: the request (unknown ids count as holding no pages).
      num_tokens: tokens the page table must cover in total (>= 0).

    Returns:
      max(0, ceil(num_tokens / page_size) - pages held).
    """
    if num_tokens < 0:
      raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    req = self._requests.get(request_id)
    held = len(req.pages) if req is not None else 0
    return max(0, -(-num_tokens // self._page_size) - held)

  def can_allocate(self, request_id: str, num_tokens: int) -> bool:
    """Whether `allocate(request_id, num_tokens)` would succeed; no change."""
    return self.num_pages_needed(request_id, num_tokens) <= self.num_free_pages

  def stats(self) -> BlockStats:
    """Returns a snapshot of page accounting and prefix-cache counters."""
    free, cached = len(self._free), len(self._lru)
    return BlockStats(
        num_pages=self._num_pages,
        free=free,
        cached=cached,
        used=self._num_pages - free - cached,
        num_requests=len(self._requests),
        prefix_queries=self._prefix_queries,
        prefix_hits=self._prefix_hits,
        evictions=self._evictions,
    )

  # --------------------------------------------------------------- mutations

  def match_prefix(self, request_id: str, token_ids: Sequence[int], keys: Sequence[bytes] = ()) -> int:
    """Starts a request's page table with the longest run of cached pages.

    Called when a request that holds no pages is first scheduled or
    re-scheduled after preemption. Takes a reference on each matched page
    (removing it from the evictable LRU). If the engine then cannot allocate
    the rest, it must call `free(request_id)` to give the matched pages back.

    Args:
      request_id: the request; must hold no pages.
      token_ids: its full known token ids (prompt + generated so far).
      keys: `page_keys(None, token_ids[:n * page_size], page_size)` for some n, if the caller has them
        (a prompt's keys, kept with it): matching and later commits read them instead of hashing those
        pages.

    Returns:
      Number of cached tokens, a multiple of page_size, at most
      len(token_ids) - 1: at least one token is always left to compute, so
      when every page is cached the last one is not matched.

    Raises:
      ValueError: if the request already holds pages.
    """
    req = self._requests.get(request_id)
    if req is not None and req.pages:
      raise ValueError(f"match_prefix: request {request_id!r} already holds "
                       f"{len(req.pages)} pages; free it first")
    if req is None:
      req = self._requests[request_id] = _RequestPages()
    self._prefix_queries += len(token_ids)
    if not self._enable_prefix_caching:
      return 0
    req.known = keys
    ps = self._page_size
    max_pages = max(0, (len(token_ids) - 1) // ps)
    prev = _ROOT_KEY
    for i in range(max_pages):
      key = keys[i] if i < len(keys) else page_key(prev, token_ids[i * ps:(i + 1) * ps])
      page = self._key_to_page.get(key)
      if page is None:
        break
      if self._refcount[page] == 0:
        del self._lru[page]
      self._refcount[page] += 1
      req.pages.append(page)
      req.keys.append(key)
      prev = key
    matched = len(req.pages) * ps
    self._prefix_hits += matched
    return matched

  def allocate(self, request_id: str, num_tokens: int) -> bool:
    """Ensures the request's page table covers num_tokens tokens in total.

    Takes fresh pages from the free pool first, then evicts the least recently
    released cached pages (dropping their keys).

    Args:
      request_id: the request; created with an empty table if unknown.
      num_tokens: tokens (already held + new) the table must cover.

    Returns:
      True on success. False if not enough pages are allocatable, in which
      case nothing changed (an unknown request is not created either).
    """
    if num_tokens < 0:
      raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    req = self._requests.get(request_id)
    # Inlined `num_pages_needed`: most calls (a decode's next token) need no page.
    needed = -(-num_tokens // self._page_size) - (len(req.pages) if req is not None else 0)
    if needed <= 0 and req is not None:
      return True
    if needed > len(self._free) + len(self._lru):
      return False
    if req is None:
      req = self._requests[request_id] = _RequestPages()
    for _ in range(needed):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._lru.popitem(last=False)
        del self._key_to_page[self._page_to_key.pop(page)]
        self._evictions += 1
      self._refcount[page] = 1
      req.pages.append(page)
    return True

  def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
             keys: Sequence[bytes] = ()) -> None:
    """Registers the request's newly full pages in the prefix cache.

    Call after a step computed KV for the first num_computed_tokens tokens.
    A page whose key is already cached by another page stays private (no
    duplicate keys); its key still extends the request's chain.

    Args:
      request_id: the request.
      token_ids: its token ids from the start (prompt + generated so far);
        at least num_computed_tokens of them.
      num_computed_tokens: tokens whose KV is now in the request's pages.
      keys: the keys of the sequence's first pages, as for `match_prefix` (this and later commits read
        them instead of hashing those pages).

    Raises:
      KeyError: unknown request.
      ValueError: num_computed_tokens beyond token_ids or the page table.
    """
    req = self._requests.get(request_id)
    if req is None:
      raise KeyError(f"commit: unknown request {request_id!r}")
    ps = self._page_size
    if not 0 <= num_computed_tokens <= len(token_ids) or num_computed_tokens > len(req.pages) * ps:
      raise ValueError(f"commit: num_computed_tokens={num_computed_tokens} outside [0, min(len(token_ids)="
                       f"{len(token_ids)}, the {len(req.pages)} pages of {request_id!r} x {ps})]")
    if keys and self._enable_prefix_caching:
      req.known = keys
    num_full = num_computed_tokens // ps
    if num_full <= len(req.keys) or not self._enable_prefix_caching:  # Most steps fill no page.
      return
    first, known = len(req.keys), req.known
    new = list(known[first:num_full])
    hashed = first + len(new)  # Pages from here on are hashed, chained to the key before them.
    if hashed < num_full:
      prev = new[-1] if new else req.keys[-1] if req.keys else _ROOT_KEY
      new += page_keys(prev, token_ids[hashed * ps:num_full * ps], ps)
    key_to_page, page_to_key = self._key_to_page, self._page_to_key
    for key, page in zip(new, req.pages[first:num_full]):
      if key not in key_to_page:
        key_to_page[key] = page
        page_to_key[page] = key
    req.keys += new

  def free(self, request_id: str) -> None:
    """Drops all of the request's references (finish, abort, preemption).

    Pages whose refcount reaches 0 become evictable cached pages if they carry
    a key, else return to the free pool. Pages are released last to first so
    that a sequence's tail is evicted before its head. Unknown ids: no-op.

    Args:
      request_id: the request.
    """
    req = self._requests.pop(request_id, None)
    if req is None:
      return
    for page in reversed(req.pages):
      self._release(page)

  def truncate(self, request_id: str, num_tokens: int) -> None:
    """Rolls the request back to its first num_tokens tokens.

    Keeps the pages covering those tokens and releases the trailing ones (as
    `free` does). A kept page that is no longer full loses its key, since the
    request will overwrite its tail. Used by speculative decoding to drop the
    pages of rejected draft tokens.

    Args:
      request_id: the request.
      num_tokens: tokens to keep (>= 0); no-op if the table covers no more.

    Raises:
      KeyError: unknown request.
      ValueError: num_tokens < 0, or the cut falls inside a page shared with
        another request (that would need copy-on-write, which this manager
        does not do). Nothing changes in either case.
    """
    req = self._requests.get(request_id)
    if req is None:
      raise KeyError(f"truncate: unknown request {request_id!r}")
    if num_tokens < 0:
      raise ValueError(f"truncate: num_tokens must be >= 0, got {num_tokens}")
    ps = self._page_size
    keep_pages = -(-num_tokens // ps)
    keep_keys = num_tokens // ps
    if keep_pages >= len(req.pages) and keep_keys >= len(req.keys):
      if len(req.known) > keep_keys:  # The tokens after the cut may change.
        req.known = req.known[:keep_keys]
      return
    if keep_keys < keep_pages:  # the last kept page becomes partial
      page = req.pages[keep_pages - 1]
      if self._refcount[page] > 1:
        raise ValueError(
            f"truncate: cutting {request_id!r} at {num_tokens} tokens would "
            f"write into page {page}, which is shared by "
            f"{self._refcount[page]} requests")
      key = self._page_to_key.pop(page, None)
      if key is not None:
        del self._key_to_page[key]
    for page in reversed(req.pages[keep_pages:]):
      self._release(page)
    del req.pages[keep_pages:]
    del req.keys[keep_keys:]
    if len(req.known) > keep_keys:
      req.known = req.known[:keep_keys]

  def reset_prefix_cache(self) -> int:
    """Invalidates the prefix cache (for example after new weights).

    Moves every evictable cached page to the free pool and unregisters the
    keys of pages still in use, so nothing computed before the reset is
    matched again; such pages go to the free pool when released.

    Returns:
      The number of cached pages moved to the free pool.
    """
    dropped = len(self._lru)
    self._free.extend(self._lru)
    self._lru.clear()
    self._key_to_page.clear()
    self._page_to_key.clear()
    return dropped

  def _release(self, page: int) -> None:
    """Drops one reference on page, parking it if it reaches 0."""
    self._refcount[page] -= 1
    if self._refcount[page] == 0:
      if page in self._page_to_key:
        self._lru[page] = None
      else:
        self._free.append(page)

  # -------------------------------------------------------------- invariants

  def check_invariants(self) -> None:
    """Checks the whole state; O(num_pages + pages held). For tests.

    Raises:
      AssertionError: describing the first inconsistency found.
    """

    def fail(msg: str) -> None:
      raise AssertionError(f"BlockManager invariant violated: {msg}")

    n = self._num_pages
    counts = [0] * n
    for rid, req in self._requests.items():
      if len(set(req.pages)) != len(req.pages):
        fail(f"request {rid!r} holds a page twice: {req.pages}")
      if len(req.keys) > len(req.pages):
        fail(f"request {rid!r} has {len(req.keys)} keys for "
             f"{len(req.pages)} pages")
      for i, page in enumerate(req.pages):
        if not (isinstance(page, int) and 0 <= page < n):
          fail(f"request {rid!r} holds bad page id {page!r}")
        counts[page] += 1
        key = self._page_to_key.get(page)
        if key is not None and (i >= len(req.keys) or req.keys[i] != key):
          fail(f"page {page} at index {i} of {rid!r} carries a key that "
               "differs from the request's key chain")
    if counts != self._refcount:
      bad = [p for p in range(n) if counts[p] != self._refcount[p]]
      fail(f"refcounts differ from page-table references at pages {bad[:10]}: "
           f"refcount={[self._refcount[p] for p in bad[:10]]}, "
           f"references={[counts[p] for p in bad[:10]]}")
    free_set = set(self._free)
    if len(free_set) != len(self._free):
      fail("a page is in the free pool twice")
    lru_set = set(self._lru)
    if free_set & lru_set:
      fail(f"pages both free and cached: {sorted(free_set & lru_set)[:10]}")
    for page in range(n):
      used = self._refcount[page] > 0
      states = int(page in free_set) + int(page in lru_set) + int(used)
      if states != 1:
        fail(f"page {page} is in {states} states (free={page in free_set}, "
             f"cached={page in lru_set}, refcount={self._refcount[page]})")
    for page in free_set:
      if page in self._page_to_key:
        fail(f"free page {page} carries a key")
    for page in lru_set:
      if page not in self._page_to_key:
        fail(f"evictable page {page} carries no key")
    if len(self._key_to_page) != len(self._page_to_key):
      fail(f"key maps differ in size: {len(self._key_to_page)} keys, "
           f"{len(self._page_to_key)} keyed pages")
    for key, page in self._key_to_page.items():
      if self._page_to_key.get(page) != key:
        fail(f"key map and page map disagree on page {page}")
    if not self._enable_prefix_caching and (self._page_to_key or self._lru):
      fail("prefix caching is disabled but pages carry keys")

  def assert_no_leaks(self) -> None:
    """Checks that no request holds a page.

    Every page must be free or held only by the prefix cache (evictable).

    Raises:
      AssertionError: listing the requests and pages still held.
    """
    holders = {rid: req.pages for rid, req in self._requests.items()
               if req.pages}
    used = [p for p in range(self._num_pages) if self._refcount[p] > 0]
    if holders or used:
      shown = dict(list(holders.items())[:10])
      raise AssertionError(
          f"KV page leak: {len(holders)} requests still hold pages "
          f"{shown}; {len(used)} pages have refcount > 0: {used[:20]}")
