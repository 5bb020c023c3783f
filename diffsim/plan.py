"""A plan: what every worker runs, at which batch size, and how queries are routed.

Routing modes:

* ``cascade`` — every query goes to the light stage; the discriminator scores each light image and a
  query whose confidence is below ``threshold`` is deferred to the heavy stage (DiffServe).
* ``split`` — query-agnostic: a fraction ``light_share`` of queries goes to the light stage and the rest
  straight to the heavy stage, no discriminator (Proteus; ``light_share`` 1 or 0 gives the single-model
  Clipper plans).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

Role = Literal["light", "heavy"]
RoutingMode = Literal["cascade", "split"]


@dataclass(frozen=True)
class StagePlan:
    role: Role
    model: str
    workers: int
    batch_size: int
    latency_s: float  # time to run one batch (light: model + discriminator in cascade mode); 0 when unused
    capacity_qps: float  # workers * batch_size / latency_s


@dataclass(frozen=True)
class Plan:
    cascade: str
    mode: RoutingMode
    stages: tuple[StagePlan, StagePlan]  # light first, then heavy; a stage may have 0 workers
    threshold: float  # cascade mode: defer when confidence < threshold
    light_share: float  # split mode: fraction routed to light; cascade mode: 1.0
    deferral_fraction: float  # predicted fraction of queries served by the heavy model
    expected_fid: float
    predicted_latency_s: float  # batch times + queueing delays along the longest path
    demand_qps: float
    gpus: int  # GPUs available
    feasible: bool
    reason: str = ""
    objective: str = "quality"
    solve_ms: float = field(default=0.0, compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def light(self) -> StagePlan:
        return self.stages[0]

    @property
    def heavy(self) -> StagePlan:
        return self.stages[1]

    @property
    def gpus_used(self) -> int:
        return self.light.workers + self.heavy.workers

    def stage(self, role: Role) -> StagePlan:
        return self.light if role == "light" else self.heavy

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["stages"] = [asdict(s) for s in self.stages]
        d["gpus_used"] = self.gpus_used
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """The plan back from :meth:`to_dict` (e.g. as served by ``GET /v1/plan``); ``gpus_used`` is derived."""
        stages = tuple(
            StagePlan(s["role"], s["model"], int(s["workers"]), int(s["batch_size"]), float(s["latency_s"]),
                      float(s["capacity_qps"]))
            for s in d["stages"]
        )
        return cls(
            cascade=d["cascade"], mode=d["mode"], stages=stages,  # type: ignore[arg-type]
            threshold=float(d["threshold"]), light_share=float(d["light_share"]),
            deferral_fraction=float(d["deferral_fraction"]), expected_fid=float(d["expected_fid"]),
            predicted_latency_s=float(d["predicted_latency_s"]), demand_qps=float(d["demand_qps"]),
            gpus=int(d["gpus"]), feasible=bool(d["feasible"]), reason=d.get("reason", ""),
            objective=d.get("objective", "quality"), solve_ms=float(d.get("solve_ms", 0.0)),
        )


def batch_size_for(plan: Optional[Plan], role: Role, default: int = 1) -> int:
    if plan is None:
        return default
    return max(1, plan.stage(role).batch_size)
