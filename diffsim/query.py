"""A query and the record it collects on its way through the cascade.

Shared by both drivers (the simulator and the server) and by the metrics that turn records into
summary.json / timeseries.csv. Every query ends in exactly one outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Outcome = Literal["completed", "dropped", "failed", "rejected"]
# completed: an image was returned (late if after the SLO);
# dropped:   removed at dequeue because it could no longer finish within drop_factor x SLO;
# failed:    the executor raised while running its batch (server only);
# rejected:  refused at admission (HTTP 429, server only).


@dataclass(slots=True)
class Query:
    id: int
    prompt_id: int
    arrival_s: float
    slo_s: float
    prompt: str = ""
    seed: int = 0
    confidence: Optional[float] = None  # discriminator confidence of the light image, once scored
    # Filled in on the way:
    stages: list[str] = field(default_factory=list)  # roles visited, in order ("light", "heavy")
    batch_sizes: list[int] = field(default_factory=list)  # size of each batch it ran in
    enqueued_s: float = 0.0  # when it entered its current queue
    queue_s: float = 0.0  # total time waiting in queues
    service_s: float = 0.0  # total time of the batches it ran in
    deferred: bool = False
    served_by: Optional[str] = None  # role whose image was returned
    outcome: Optional[Outcome] = None
    finished_s: Optional[float] = None  # completion, drop, failure or rejection time
    error: str = ""

    @property
    def deadline_s(self) -> float:
        return self.arrival_s + self.slo_s

    @property
    def latency_s(self) -> Optional[float]:
        return None if self.finished_s is None else self.finished_s - self.arrival_s

    @property
    def late(self) -> bool:
        return self.outcome == "completed" and self.finished_s is not None and self.finished_s - self.arrival_s > self.slo_s

    @property
    def fell_back(self) -> bool:
        """Deferred and answered with its light image (the light fallback: the heavy one would have been late)."""
        return self.outcome == "completed" and self.deferred and self.served_by == "light"

    @property
    def violation(self) -> bool:
        """An SLO violation: late, or not served at all (dropped, failed, rejected)."""
        return self.outcome != "completed" or self.late

    def finish(self, outcome: Outcome, now: float, served_by: Optional[str] = None, error: str = "") -> None:
        if self.outcome is not None:
            raise RuntimeError(f"query {self.id} already ended as {self.outcome}")
        self.outcome = outcome
        self.finished_s = now
        self.served_by = served_by
        self.error = error
