"""The engine's part in disaggregated serving (`pdopt.deploy`): a prefill instance hands prefilled requests
over with their pages held until the decode side has them; a decode instance takes such a request in."""

from __future__ import annotations

from pdopt.engine.request import Request, RequestStatus


class Handoffs:
  """Methods of `Engine` (which holds `requests`, `running`, `block_manager`, `executor` and `_handoffs`)."""

  def take_handoffs(self) -> list[Request]:
    """Requests prefilled since the last call (with `handoff_after_prefill`); they still hold their pages
    until `release_handoff`."""
    out, self._handoffs = self._handoffs, []
    return out

  def release_handoff(self, request_id: str) -> None:
    """Frees the pages of a handed-off request once its K/V has been copied elsewhere."""
    if self.requests[request_id].status is not RequestStatus.HANDED_OFF:
      raise ValueError(f"request {request_id!r} was not handed off")
    self.block_manager.free(request_id)

  def import_request(self, request: Request, kv: list, num_pages: int) -> bool:
    """Continues a request prefilled elsewhere (one token generated): allocates pages, writes its K/V (`kv`,
    `num_pages` real pages, from `export_pages` of an executor with the same cache layout, already on this
    engine's devices) and starts decoding it. Returns False (nothing changed) if the pool cannot hold it now."""
    rid = request.request_id
    if rid in self.requests:
      raise ValueError(f"request_id {rid!r} is already in use")
    if not self.block_manager.allocate(rid, request.num_computed_tokens):
      return False
    self.executor.import_pages(rid, kv, num_pages)
    request.status = RequestStatus.RUNNING
    self.requests[rid] = request
    self.running.append(rid)
    bm = self.block_manager
    bm.commit(rid, request.all_token_ids, request.num_computed_tokens,
              request.prompt_keys(bm.page_size) if bm.enable_prefix_caching else ())
    return True
