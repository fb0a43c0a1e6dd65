"""Device meshes and the one table that maps logical axis names to mesh axes."""

from pdopt.sharding.distributed import SharedClock, initialize
from pdopt.sharding.mesh import MeshConfig, data_submeshes, make_mesh
from pdopt.sharding.rules import (LOGICAL_RULES, cache_sharding, param_shardings, put_global, shard_model,
                                  validate_tensor_parallel)

__all__ = ["LOGICAL_RULES", "MeshConfig", "SharedClock", "cache_sharding", "data_submeshes", "initialize", "make_mesh",
           "param_shardings", "put_global", "shard_model", "validate_tensor_parallel"]
