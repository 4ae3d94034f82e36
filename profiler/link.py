"""Link profile: latency and bandwidth of the stage-to-stage activation hop, measured on the real
Forward stream.

A probe stage server holds the last layer of a tiny random Llama (hidden 64, so compute is small and
the message size is set by batch x width). The client sends prefill micro-batches of hidden states
of 1 KiB .. 16 MiB, as a previous stage would, and times each round trip; the server reports its own
compute and queue time in the reply, which is subtracted. What is left is one activation message
(encode, chunk, send, reassemble) plus one tiny token-id reply, i.e. the planner's
`Network.link_seconds(bytes)` plus the return link: fitted as `2 x latency + bytes / bandwidth`
(non-negative least squares on relative error, as for layers).

Loopback (default: the probe server runs in this process) measures the gRPC stack on one host: the
`intra_host_*` figures. For a network figure run `pqmesh profile link --serve` on one host and
`pqmesh profile link --target HOST:PORT` on another.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from pqmesh.errors import FailedPrecondition, InvalidArgument
from profiler.fit import fit_coefficients

log = structlog.get_logger(__name__)
LINK_FORMAT = 1
PROBE_MODEL = "pqmesh-link-probe"
PROBE_HIDDEN = 64
MAX_WIDTH = 128
DEFAULT_SIZES = tuple(1 << k for k in range(10, 25, 2))  # 1 KiB .. 16 MiB


@dataclass(frozen=True)
class LinkProfile:
    latency_us: float  # one way
    bandwidth_gbps: float
    loopback: bool
    samples: tuple[tuple[int, float], ...]  # (bytes, seconds) round trip minus server time
    address: str = ""

    def __post_init__(self) -> None:
        if self.latency_us < 0 or not self.bandwidth_gbps > 0:
            raise InvalidArgument(f"link profile needs latency >= 0 and bandwidth > 0, got {self.latency_us} us, "
                                  f"{self.bandwidth_gbps} Gbit/s")

    def toml(self) -> str:
        """The cluster file's [network] lines these figures fill."""
        prefix = "intra_host_" if self.loopback else ""
        where = "one host (loopback gRPC)" if self.loopback else f"the network to {self.address}"
        return (f"[network]  # measured by pqmesh profile link over {where}\n"
                f"{prefix}bandwidth_gbps = {self.bandwidth_gbps:.3g}\n{prefix}latency_us = {self.latency_us:.3g}\n")

    def to_json(self) -> dict:
        return {
            "format": LINK_FORMAT,
            "kind": "link",
            "latency_us": self.latency_us,
            "bandwidth_gbps": self.bandwidth_gbps,
            "loopback": self.loopback,
            "address": self.address,
            "samples": [{"bytes": b, "seconds": s} for b, s in self.samples],
            "network_toml": self.toml(),
        }


def fit_link(samples: list[tuple[int, float]], loopback: bool, address: str = "") -> LinkProfile:
    if len(samples) < 3:
        raise InvalidArgument(f"{len(samples)} link samples cannot fit latency and bandwidth; give >= 3 sizes")
    rows = np.array([[1.0, float(b)] for b, _ in samples])
    seconds = np.array([s for _, s in samples])
    const, per_byte = fit_coefficients(rows, seconds)
    if per_byte <= 0:
        raise FailedPrecondition("link times do not grow with message size; measure larger messages or on an idle host")
    return LinkProfile(const / 2 * 1e6, 8 / per_byte / 1e9, loopback, tuple(samples), address)


def write_probe_checkpoint(root: Path) -> Path:
    """A 2-layer random Llama (hidden 64, vocab 16) under `root`/PROBE_MODEL; returns `root`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = root / PROBE_MODEL
    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=PROBE_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=16,
            max_position_embeddings=MAX_WIDTH,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(directory)
    return root


def start_probe_server(listen: str, root: Path):
    """A stage server on `listen` whose model root holds the probe checkpoint; (server, port, servicer)."""
    from stage_server.config import StageConfig
    from stage_server.main import serve

    return serve(StageConfig(listen, "cpu", 2 << 30, write_probe_checkpoint(root), queue_depth=4, log_level="warning"))


def _shape(nbytes: int) -> tuple[int, int]:
    tokens = max(1, nbytes // (PROBE_HIDDEN * 4))
    width = min(MAX_WIDTH, tokens)
    return max(1, tokens // width), width


def measure(address: str, sizes=DEFAULT_SIZES, repeats: int = 5) -> list[tuple[int, float]]:
    """(bytes, median seconds) per size: Forward round trip minus the server's compute and queue time."""
    from pqmesh.api.common.v1 import tensor_pb2
    from pqmesh.api.stage.v1 import stage_pb2
    from pqmesh.stage_client import StageClient

    shapes = [_shape(n) for n in sizes]
    max_batch = max(b for b, _ in shapes)
    client = StageClient(address)
    try:
        client.load_shard(stage_pb2.LoadShardRequest(
            plan_id="link-probe", model_id=PROBE_MODEL, layers=tensor_pb2.LayerRange(start=1, end=2), bits=[16],
            role=stage_pb2.ROLE_LAST, max_sequences=max_batch, max_tokens_per_sequence=MAX_WIDTH), timeout=60)
        stream, samples, ids = client.forward(), [], itertools.count()
        try:
            for batch, width in shapes:
                hidden = torch.randn(batch, width, PROBE_HIDDEN)
                slots, times = list(range(batch)), []
                for i in range(repeats + 1):  # the first is a warm-up
                    started = time.perf_counter()
                    stream.send_batch("link-probe", next(ids), tensor_pb2.PHASE_PREFILL, slots, [width] * batch, hidden)
                    reply = next(stream.responses)
                    elapsed = time.perf_counter() - started - (reply.compute_ns + reply.queue_ns) / 1e9
                    client.release("link-probe", slots)
                    if i:
                        times.append(max(elapsed, 1e-7))
                samples.append((hidden.nbytes, statistics.median(times)))
                log.info("link_size_measured", bytes=hidden.nbytes, seconds=samples[-1][1])
        finally:
            stream.close()
    finally:
        client.close()
    return samples


def profile_link(target: str = "", sizes=DEFAULT_SIZES, repeats: int = 5) -> LinkProfile:
    """Measures against `target` (HOST:PORT of a `--serve` probe), or an in-process loopback probe."""
    if target:
        return fit_link(measure(target, sizes, repeats), loopback=False, address=target)
    with tempfile.TemporaryDirectory(prefix="pqmesh-link-") as root:
        server, port, servicer = start_probe_server("127.0.0.1:0", Path(root))
        try:
            samples = measure(f"127.0.0.1:{port}", sizes, repeats)
        finally:
            server.stop(None)
            servicer.worker.stop()
    return fit_link(samples, loopback=True, address=f"127.0.0.1:{port}")


def write(link: LinkProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(link.to_json(), indent=1) + "\n")
