"""Tests for the host-side KV page allocator (pdopt/cache/block_manager.py)."""

import random
import re

import pytest

from pdopt.cache.block_manager import BlockManager
from pdopt.cache.block_manager import BlockStats
from pdopt.cache.block_manager import page_key
from pdopt.cache.block_manager import page_keys


def _run_prompt(bm, rid, tokens):
  """Admits a request and computes its whole prompt; returns cached tokens."""
  cached = bm.match_prefix(rid, tokens)
  assert bm.allocate(rid, len(tokens))
  bm.commit(rid, tokens, len(tokens))
  bm.check_invariants()
  return cached


# ----------------------------------------------------------------- construction


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_pages=0, page_size=16), "num_pages"),
    (dict(num_pages=-3, page_size=16), "num_pages"),
    (dict(num_pages=2.5, page_size=16), "num_pages"),
    (dict(num_pages=True, page_size=16), "num_pages"),
    (dict(num_pages=8, page_size=0), "page_size"),
    (dict(num_pages=8, page_size="16"), "page_size"),
    (dict(num_pages=8, page_size=16, enable_prefix_caching=1),
     "enable_prefix_caching"),
])
def test_constructor_validation_names_field_and_value(kwargs, field):
  with pytest.raises(ValueError, match=field) as err:
    BlockManager(**kwargs)
  assert repr(kwargs[field]) in str(err.value)


def test_fresh_pool_accounting():
  bm = BlockManager(num_pages=10, page_size=4)
  assert bm.max_tokens_capacity == 40
  assert bm.num_free_pages == 10
  s = bm.stats()
  assert isinstance(s, BlockStats)
  assert (s.num_pages, s.free, s.cached, s.used) == (10, 10, 0, 0)
  assert s.hit_rate == 0.0
  with pytest.raises(AttributeError):
    s.free = 3  # frozen
  bm.check_invariants()
  bm.assert_no_leaks()


def test_page_key_is_deterministic_and_chained():
  a = page_key(None, [1, 2, 3])
  assert a == page_key(b"", [1, 2, 3])
  assert len(a) == 32
  # Fixed digest: the same in every process (no PYTHONHASHSEED dependence).
  assert a.hex() == page_key(None, (1, 2, 3)).hex()
  assert page_key(a, [4, 5, 6]) != page_key(None, [4, 5, 6])
  assert page_key(None, [1, 2, 3]) != page_key(None, [3, 2, 1])


# ---------------------------------------------------------------- allocation


def test_allocate_and_num_pages_needed():
  bm = BlockManager(num_pages=8, page_size=4)
  assert bm.num_pages_needed("a", 0) == 0
  assert bm.num_pages_needed("a", 1) == 1
  assert bm.num_pages_needed("a", 9) == 3
  assert bm.allocate("a", 9)
  assert len(bm.page_table("a")) == 3
  assert bm.num_pages_needed("a", 12) == 0
  assert bm.num_pages_needed("a", 13) == 1
  assert bm.allocate("a", 12)  # already covered: no new page
  assert len(bm.page_table("a")) == 3
  assert bm.stats().used == 3 and bm.num_free_pages == 5
  bm.check_invariants()
  bm.free("a")
  bm.assert_no_leaks()


def test_allocate_failure_changes_nothing():
  bm = BlockManager(num_pages=4, page_size=4)
  _run_prompt(bm, "a", list(range(8)))  # two full cached pages once freed
  bm.free("a")
  assert bm.allocate("b", 4)
  before = (bm.stats(), bm.page_table("b"), bm.num_free_pages)
  assert not bm.can_allocate("b", 4 * 5)
  assert not bm.allocate("b", 4 * 5)  # needs 4 more, only 3 allocatable
  assert (bm.stats(), bm.page_table("b"), bm.num_free_pages) == before
  # An unknown request is not created by a failed allocation.
  assert not bm.allocate("c", 100)
  assert not bm.has_request("c")
  assert bm.stats().cached == 2  # nothing was evicted
  bm.check_invariants()


def test_request_larger_than_pool_is_detectable():
  bm = BlockManager(num_pages=4, page_size=16)
  assert bm.max_tokens_capacity == 64
  assert bm.num_pages_needed("x", 65) > bm.num_pages
  assert not bm.allocate("x", 65)
  assert bm.allocate("x", 64)


def test_free_unknown_is_noop_and_page_table_unknown_is_empty():
  bm = BlockManager(num_pages=4, page_size=4)
  bm.free("nope")
  assert bm.page_table("nope") == []
  bm.check_invariants()


# ------------------------------------------------------------ prefix caching


def test_shared_prefix_shares_pages_and_counts_hits():
  bm = BlockManager(num_pages=32, page_size=4)
  prefix = list(range(100, 112))  # 3 full pages
  a = prefix + [1, 2, 3]
  b = prefix + [7, 8, 9, 10, 11]
  assert _run_prompt(bm, "a", a) == 0
  assert _run_prompt(bm, "b", b) == 12
  assert bm.page_table("a")[:3] == bm.page_table("b")[:3]
  assert bm.page_table("a")[3] != bm.page_table("b")[3]
  s = bm.stats()
  assert s.used == 4 + 2  # 3 shared + a's tail + b's 2 tail pages
  assert s.prefix_queries == len(a) + len(b)
  assert s.prefix_hits == 12
  assert s.hit_rate == pytest.approx(12 / (len(a) + len(b)))
  # Freeing one sharer keeps the shared pages in use.
  bm.free("a")
  bm.check_invariants()
  shared = bm.page_table("b")[:3]
  assert bm.stats().used == 3 + 2
  assert bm.match_prefix("c", prefix + [0]) == 12
  assert bm.page_table("c") == shared
  bm.free("b")
  bm.free("c")
  bm.check_invariants()
  bm.assert_no_leaks()


def test_cached_unreferenced_pages_are_reused_by_identical_prefix():
  bm = BlockManager(num_pages=16, page_size=4)
  tokens = list(range(10))  # pages: [0..3] [4..7] [8, 9]
  _run_prompt(bm, "a", tokens)
  pages = bm.page_table("a")
  bm.free("a")
  s = bm.stats()
  assert (s.cached, s.used, s.free) == (2, 0, 14)  # partial page went free
  assert bm.num_free_pages == 16
  bm.assert_no_leaks()
  assert bm.match_prefix("b", tokens) == 8
  assert bm.page_table("b") == pages[:2]
  assert bm.stats().cached == 0 and bm.stats().used == 2
  bm.check_invariants()


def test_match_never_returns_full_length():
  bm = BlockManager(num_pages=16, page_size=4)
  tokens = list(range(12))  # exactly 3 full pages
  _run_prompt(bm, "a", tokens)
  bm.free("a")
  assert bm.match_prefix("b", tokens) == 8  # last page left to compute
  assert len(bm.page_table("b")) == 2
  assert bm.match_prefix("c", tokens + [99]) == 12
  assert bm.match_prefix("d", tokens[:1]) == 0
  assert bm.match_prefix("e", []) == 0
  for rid in "bcde":
    bm.free(rid)
  bm.check_invariants()
  bm.assert_no_leaks()


def test_match_prefix_rejects_request_holding_pages():
  bm = BlockManager(num_pages=4, page_size=4)
  assert bm.allocate("a", 4)
  with pytest.raises(ValueError, match="already holds"):
    bm.match_prefix("a", [1, 2, 3, 4, 5])


def test_prefix_must_match_from_the_start():
  bm = BlockManager(num_pages=16, page_size=4)
  _run_prompt(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
  bm.free("a")
  # Same second page content but a different first page: no match.
  assert bm.match_prefix("b", [0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0
  assert bm.match_prefix("c", [1, 2, 3, 4, 0, 6, 7, 8, 9]) == 4


def test_lru_eviction_order():
  bm = BlockManager(num_pages=6, page_size=2)
  x = [1, 2, 3, 4]  # 2 full pages
  y = [5, 6, 7, 8]
  _run_prompt(bm, "x", x)
  _run_prompt(bm, "y", y)
  px, py = bm.page_table("x"), bm.page_table("y")
  bm.free("x")  # released first: evicted first
  bm.free("y")
  assert bm.stats().cached == 4 and bm.stats().free == 2
  # 2 free pages, then x's tail, then x's head (tail before head).
  assert bm.allocate("z", 2 * 2)
  assert bm.stats().evictions == 0
  assert bm.allocate("z", 2 * 3)
  assert bm.page_table("z")[2] == px[1]
  assert bm.allocate("z", 2 * 4)
  assert bm.page_table("z")[3] == px[0]
  assert bm.stats().evictions == 2
  # x is gone from the cache, y is intact.
  assert bm.match_prefix("x2", x + [0]) == 0
  assert bm.match_prefix("y2", y + [0]) == 4
  assert bm.page_table("y2") == py
  bm.check_invariants()


def test_match_refreshes_lru_position():
  bm = BlockManager(num_pages=4, page_size=2)
  _run_prompt(bm, "x", [1, 2])
  _run_prompt(bm, "y", [3, 4])
  px = bm.page_table("x")
  bm.free("x")
  bm.free("y")
  # Re-using x makes it the most recently released page.
  bm.match_prefix("x2", [1, 2, 0])
  bm.free("x2")
  assert bm.allocate("z", 2 * 3)  # 2 free + 1 eviction: y's page goes
  assert px[0] not in bm.page_table("z")
  assert bm.match_prefix("x3", [1, 2, 0]) == 2


def test_commit_with_duplicate_keys_keeps_page_private():
  bm = BlockManager(num_pages=16, page_size=4)
  tokens = list(range(9))
  # Both compute the same prompt without sharing (b was admitted before a
  # committed), so b's first two pages duplicate a's keys.
  assert bm.match_prefix("a", tokens) == 0
  assert bm.match_prefix("b", tokens) == 0
  assert bm.allocate("a", 9) and bm.allocate("b", 9)
  bm.commit("a", tokens, 9)
  bm.commit("b", tokens, 9)
  bm.check_invariants()
  pa, pb = bm.page_table("a"), bm.page_table("b")
  assert not set(pa) & set(pb)
  bm.free("b")  # b's pages carry no key: straight back to the free pool
  s = bm.stats()
  assert s.cached == 0 and s.free == 16 - 3
  assert bm.match_prefix("c", tokens) == 8
  assert bm.page_table("c") == pa[:2]
  bm.free("a")
  bm.free("c")
  bm.check_invariants()
  bm.assert_no_leaks()


def test_commit_chain_continues_after_private_duplicate():
  bm = BlockManager(num_pages=16, page_size=2)
  assert bm.match_prefix("a", [1, 2, 3]) == 0
  assert bm.match_prefix("b", [1, 2, 3, 4, 5]) == 0
  assert bm.allocate("a", 3) and bm.allocate("b", 5)
  bm.commit("a", [1, 2, 3], 3)        # registers [1, 2]
  bm.commit("b", [1, 2, 3, 4, 5], 5)  # [1, 2] private dup; [3, 4] registered
  pb = bm.page_table("b")
  bm.free("a")
  bm.free("b")
  assert bm.match_prefix("c", [1, 2, 3, 4, 0]) == 4
  assert bm.page_table("c")[1] == pb[1]
  bm.check_invariants()


def test_incremental_commit_and_decode():
  bm = BlockManager(num_pages=16, page_size=4)
  tokens = list(range(6))
  bm.match_prefix("a", tokens)
  assert bm.allocate("a", 3)
  bm.commit("a", tokens, 3)  # chunked prefill: no full page yet
  assert bm.allocate("a", 6)
  bm.commit("a", tokens, 6)  # page 0 full now
  for t in (6, 7, 8):  # decode tokens
    tokens.append(t)
    assert bm.allocate("a", len(tokens))
    bm.commit("a", tokens, len(tokens))
    bm.check_invariants()
  bm.free("a")
  assert bm.match_prefix("b", tokens + [9]) == 8


def test_commit_errors():
  bm = BlockManager(num_pages=4, page_size=4)
  with pytest.raises(KeyError):
    bm.commit("nope", [1], 1)
  assert bm.allocate("a", 4)
  with pytest.raises(ValueError):
    bm.commit("a", [1, 2], 3)  # more than the token ids
  with pytest.raises(ValueError):
    bm.commit("a", list(range(8)), 8)  # more than the page table covers


def test_prefix_caching_disabled():
  bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
  tokens = list(range(13))
  assert _run_prompt(bm, "a", tokens) == 0
  bm.free("a")
  assert bm.stats().cached == 0 and bm.stats().free == 8
  assert _run_prompt(bm, "b", tokens) == 0
  bm.free("b")
  bm.check_invariants()
  bm.assert_no_leaks()


def test_reset_prefix_cache():
  bm = BlockManager(num_pages=8, page_size=4)
  tokens = list(range(9))
  _run_prompt(bm, "a", tokens)
  _run_prompt(bm, "b", [50] * 5)
  bm.free("a")
  assert bm.stats().cached == 2
  assert bm.reset_prefix_cache() == 2
  s = bm.stats()
  assert s.cached == 0 and s.free == 8 - 2
  assert bm.match_prefix("c", tokens) == 0
  bm.free("b")  # its key was dropped too: its page goes free
  bm.free("c")
  assert bm.stats().free == 8
  bm.check_invariants()


# ------------------------------------------------------------------- truncate


def test_truncate_releases_trailing_pages():
  bm = BlockManager(num_pages=8, page_size=4)
  tokens = list(range(14))
  bm.match_prefix("a", tokens)
  assert bm.allocate("a", 14)
  bm.commit("a", tokens, 10)  # 2 pages keyed, 2 private
  pages = bm.page_table("a")
  bm.truncate("a", 9)
  assert bm.page_table("a") == pages[:3]
  assert bm.stats().used == 3 and bm.stats().free == 5
  bm.truncate("a", 20)  # covers fewer tokens already: no-op
  assert bm.page_table("a") == pages[:3]
  # Cut into a keyed private page: it loses its key (its tail is rewritten).
  bm.truncate("a", 6)
  assert bm.page_table("a") == pages[:2]
  bm.check_invariants()
  assert bm.stats().cached == 0
  bm.commit("a", tokens[:6] + [90, 91], 8)  # a different second page
  bm.free("a")
  assert bm.match_prefix("b", tokens) == 4
  bm.free("b")
  assert bm.match_prefix("c", tokens[:6] + [90, 91, 0]) == 8
  bm.truncate("c", 0)
  assert bm.page_table("c") == []
  assert bm.stats().cached == 2  # released full pages stay cached
  bm.check_invariants()


def test_truncate_into_shared_page_is_refused_without_change():
  bm = BlockManager(num_pages=8, page_size=4)
  tokens = list(range(9))
  _run_prompt(bm, "a", tokens)
  assert bm.match_prefix("b", tokens) == 8
  before = (bm.stats(), bm.page_table("a"), bm.page_table("b"))
  with pytest.raises(ValueError, match="shared"):
    bm.truncate("b", 6)
  assert (bm.stats(), bm.page_table("a"), bm.page_table("b")) == before
  bm.truncate("b", 4)  # a page boundary: just drops a reference
  assert bm.page_table("b") == bm.page_table("a")[:1]
  bm.check_invariants()
  with pytest.raises(KeyError):
    bm.truncate("nope", 0)
  with pytest.raises(ValueError):
    bm.truncate("a", -1)


# -------------------------------------------------------------- diagnostics


def test_invariant_and_leak_checks_report_offenders():
  bm = BlockManager(num_pages=4, page_size=4)
  assert bm.allocate("leaky", 5)
  with pytest.raises(AssertionError, match="leaky"):
    bm.assert_no_leaks()
  bm._refcount[bm.page_table("leaky")[0]] += 1  # corrupt on purpose
  with pytest.raises(AssertionError, match="refcount"):
    bm.check_invariants()


# ------------------------------------------------------------------- stress


class _Req:

  def __init__(self, tokens):
    self.tokens = tokens
    self.computed = 0
    self.running = False


class _Twins:
  """Two managers driven alike: `match_prefix` and `commit` hand the first one the keys of a random number of
  the sequence's first full pages (as a caller that kept a prompt's keys does) and the second none. Every answer
  must agree, and `check` compares their page tables, key chains and cache maps."""

  def __init__(self, rng: random.Random, **kwargs):
    self.rng, self.keyed, self.hashing = rng, BlockManager(**kwargs), BlockManager(**kwargs)

  def _keys(self, tokens):
    ps = self.keyed.page_size
    return page_keys(None, tokens[:self.rng.randint(0, len(tokens) // ps) * ps], ps)

  def match_prefix(self, rid, tokens):
    out = self.keyed.match_prefix(rid, tokens, self._keys(tokens))
    assert self.hashing.match_prefix(rid, tokens) == out
    return out

  def commit(self, rid, tokens, num_computed):
    keys = self._keys(tokens) if self.rng.random() < 0.2 else ()
    self.keyed.commit(rid, tokens, num_computed, keys)
    self.hashing.commit(rid, tokens, num_computed)

  def __getattr__(self, name):
    keyed, hashing = getattr(self.keyed, name), getattr(self.hashing, name)
    if not callable(keyed):
      return keyed

    def both(*args):
      try:
        out = keyed(*args)
      except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
          hashing(*args)
        raise
      assert hashing(*args) == out, name
      return out

    return both

  def check(self):
    a, b = self.keyed, self.hashing
    assert a._key_to_page == b._key_to_page and a._page_to_key == b._page_to_key
    assert {r: (q.pages, q.keys) for r, q in a._requests.items()} == {r: (q.pages, q.keys)
                                                                     for r, q in b._requests.items()}


@pytest.mark.parametrize("seed, ps, caching", [
    (0, 2, True), (1, 1, True), (2, 4, True), (3, 3, True), (4, 2, False)])
def test_randomized_stress(seed, ps, caching):
  """Random engine-like traffic; a shadow KV pool checks what pages hold.

  Every computed token is written into a shadow copy of its page slot, so a
  prefix-cache hit on a page with stale or foreign content, or a write into a
  page shared with another request, fails the test. Keys handed in by the
  caller must leave the same state as keys hashed by the manager (`_Twins`),
  also after a rollback changes the tokens after the cut.
  """
  rng = random.Random(seed)
  num_pages = rng.randint(12, 40)
  bm = _Twins(random.Random(seed + 100), num_pages=num_pages, page_size=ps, enable_prefix_caching=caching)
  max_len = num_pages * ps // 2
  bases = [[rng.randrange(50) for _ in range(max_len)] for _ in range(3)]
  shadow = [[None] * ps for _ in range(num_pages)]
  reqs: dict[str, _Req] = {}
  next_id = 0

  def tokens_fit(r):
    return len(r.tokens) < max_len

  def write(rid, start, stop):
    table = bm.page_table(rid)
    r = reqs[rid]
    for t in range(start, stop):
      page = table[t // ps]
      assert bm.ref_count(page) == 1, f"write into shared page {page}"
      shadow[page][t % ps] = r.tokens[t]

  def compute(rid, stop):
    """Allocates and computes tokens [computed, stop); preempts on failure."""
    r = reqs[rid]
    predicted = bm.can_allocate(rid, stop)
    before = (bm.stats(), bm.page_table(rid))
    ok = bm.allocate(rid, stop)
    assert ok == predicted
    if not ok:
      assert (bm.stats(), bm.page_table(rid)) == before
      bm.free(rid)  # preempt by recompute
      r.running, r.computed = False, 0
      return False
    write(rid, r.computed, stop)
    r.computed = stop
    bm.commit(rid, r.tokens, r.computed)
    return True

  for _ in range(3000):
    op = rng.random()
    waiting = [k for k, r in reqs.items() if not r.running]
    running = [k for k, r in reqs.items() if r.running]
    if op < 0.12 and len(reqs) < 8:  # arrival
      base = rng.choice(bases)
      cut = rng.randrange(max_len // 2)
      tokens = base[:cut] + [rng.randrange(4) for _ in range(rng.randint(1, 6))]
      reqs[f"r{next_id}"] = _Req(tokens)
      next_id += 1
    elif op < 0.35 and waiting:  # (re)schedule: match, then a first chunk
      rid = rng.choice(waiting)
      r = reqs[rid]
      cached = bm.match_prefix(rid, r.tokens)
      assert cached % ps == 0 and 0 <= cached <= max(0, len(r.tokens) - 1)
      table = bm.page_table(rid)
      assert len(table) == cached // ps
      for i, page in enumerate(table):
        assert shadow[page] == r.tokens[i * ps:(i + 1) * ps], "stale hit"
      r.running, r.computed = True, cached
      stop = min(len(r.tokens), cached + rng.randint(1, 3 * ps))
      compute(rid, stop)
    elif op < 0.75 and running:  # a step: prefill chunk or decode
      rid = rng.choice(running)
      r = reqs[rid]
      if r.computed < len(r.tokens):
        compute(rid, min(len(r.tokens), r.computed + rng.randint(1, 3 * ps)))
      elif not tokens_fit(r):
        bm.free(rid)  # finished
        del reqs[rid]
      elif rng.random() < 0.3:  # speculative: k drafts, accept some, roll back
        k = rng.randint(1, 3)
        drafts = [rng.randrange(4) for _ in range(k + 1)]
        start = r.computed
        r.tokens = r.tokens + drafts
        if compute(rid, start + k + 1):
          accepted = rng.randint(1, k + 1)
          r.tokens = r.tokens[:start + accepted]
          r.computed = start + accepted
          bm.truncate(rid, r.computed)
          assert len(bm.page_table(rid)) == -(-r.computed // ps)
        else:
          r.tokens = r.tokens[:start]
      else:  # plain decode of one token
        r.tokens = r.tokens + [rng.randrange(4)]
        compute(rid, len(r.tokens))
    elif op < 0.82 and running:  # arbitrary rollback, possibly into the prompt
      rid = rng.choice(running)
      r = reqs[rid]
      n = rng.randint(1, max(1, r.computed))
      before = (bm.stats(), bm.page_table(rid))
      try:
        bm.truncate(rid, n)
      except ValueError as e:
        assert "shared" in str(e)
        assert (bm.stats(), bm.page_table(rid)) == before
      else:
        r.computed = min(r.computed, n)
        # New, different tokens follow the cut: stale keys would show up.
        r.tokens = r.tokens[:n] + [rng.randrange(4) + 50]
    elif op < 0.9 and reqs:  # finish or abort (waiting or running)
      rid = rng.choice(list(reqs))
      bm.free(rid)
      del reqs[rid]
    elif op < 0.905:
      bm.reset_prefix_cache()
    elif op < 0.92:
      bm.free("never-seen")
    bm.check_invariants()
    bm.check()
    s = bm.stats()
    assert s.free + s.cached + s.used == num_pages
    assert bm.num_free_pages == s.free + s.cached
  assert bm.stats().prefix_queries > 0
  for rid in list(reqs):
    bm.free(rid)
  bm.check_invariants()
  bm.assert_no_leaks()
  assert bm.stats().used == 0
