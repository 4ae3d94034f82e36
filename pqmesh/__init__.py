"""pqmesh: serve large decoder-only LLMs on mixed GPUs (LLM-PQ plans on a gRPC mesh)."""

__version__ = "0.1.0"
