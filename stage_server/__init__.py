"""Stage server: one process per GPU host holding a contiguous shard of decoder layers."""
