"""KV cache: device pages and the host-side page allocator."""

from pdopt.cache.block_manager import BlockManager
from pdopt.cache.block_manager import BlockStats

__all__ = ["BlockManager", "BlockStats"]
