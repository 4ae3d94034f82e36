"""Every job checks the cost model: its predicted time (the plan's `MeshCost` replayed by
`pqmesh.mesh_sim` for this job's prompts) beside its measured time, in JobProgress, in the log and
as Prometheus gauges of the last finished job. A plan without a cost (written by hand, or by an
older planner) predicts nothing (0).

The prediction assumes the job has the mesh to itself and runs every sequence to its max_new_tokens
(the request's own, else the job's);
measured time runs from the job's first micro-batch to its last stored sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import structlog

from pqmesh.length_groups import DEFAULT_WINDOW
from pqmesh.mesh_sim import simulate
from pqmesh.plan import PipelinePlan

log = structlog.get_logger(__name__)


def predict_job_seconds(plan: PipelinePlan, prompt_lengths: Sequence[int], max_new_tokens: int | Sequence[int],
                        max_sequences: int, max_in_flight: int = 0, group_window: int = DEFAULT_WINDOW) -> float:
    """Predicted seconds of a job on this plan's mesh; 0.0 when the plan carries no cost."""
    if plan.cost is None or not prompt_lengths:
        return 0.0
    return simulate(plan.cost, prompt_lengths, max_new_tokens, max_sequences, plan.prefill_micro_batch,
                    plan.decode_micro_batch, max_in_flight, group_window).job_s


@dataclass(frozen=True)
class JobTiming:
    """Predicted and measured seconds of one finished job."""

    job_id: str
    predicted_s: float
    measured_s: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured; 0 when either is unknown."""
        if self.predicted_s <= 0 or self.measured_s <= 0:
            return 0.0
        return (self.predicted_s - self.measured_s) / self.measured_s

    def logged(self) -> JobTiming:
        log.info("job_prediction_checked", job_id=self.job_id, predicted_s=round(self.predicted_s, 3),
                 measured_s=round(self.measured_s, 3), error=round(self.error, 4))
        return self


def add_gauges(metrics, board) -> None:
    """Gauges of the last finished job's predicted and measured time, read at scrape time."""
    def last(field: str):
        return lambda: getattr(board.last_timing, field) if board.last_timing is not None else 0.0

    metrics.gauge_of("pqmesh_coordinator_last_job_predicted_seconds",
                     "Predicted time of the last finished job (the plan's cost model, replayed)", last("predicted_s"))
    metrics.gauge_of("pqmesh_coordinator_last_job_measured_seconds",
                     "Measured time of the last finished job, first micro-batch to last stored sequence",
                     last("measured_s"))
    metrics.gauge_of("pqmesh_coordinator_last_job_prediction_error_ratio",
                     "(predicted - measured) / measured of the last finished job; a stale device profile "
                     "shows here", last("error"))
