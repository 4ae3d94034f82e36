"""Model core: run any contiguous range of decoder layers of a Hugging Face checkpoint.

`ModelShard` is what a stage server holds; `LocalPipeline` chains shards in one process (tests,
demo, in-process baselines). Family specifics (OPT, BLOOM, Llama-style) live in `families`.
"""

from pqmesh.model.kv_cache import StaticKVCache
from pqmesh.model.local_pipeline import LocalPipeline
from pqmesh.model.shard import ModelShard

__all__ = ["StaticKVCache", "ModelShard", "LocalPipeline"]
