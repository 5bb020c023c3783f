"""Shared by the simulator's tests: fixed plans and a policy that always returns one."""

from __future__ import annotations

from diffsim.runtime.batching import service_time_s
from diffsim.plan import Plan, StagePlan
from diffsim.profiles import Cascade, load_cascade
from diffsim.resources import profiles_dir, resolve_profile


def a100_cascade(name: str = "sdturbo-sdv15") -> Cascade:
    return load_cascade(name, resolve_profile("a100"), profiles_dir() / "cascades.yaml")


def fixed_plan(cascade: Cascade, light: int, heavy: int, b_light: int, b_heavy: int, threshold: float = 0.0,
               *, mode: str = "cascade", light_share: float = 1.0) -> Plan:
    """A plan with the given workers, batch sizes and threshold (cascade) or light share (split)."""

    def stage(role, model, workers, b, disc):
        if workers == 0:
            return StagePlan(role, model, 0, 0, 0.0, 0.0)
        lat = service_time_s(cascade, role, b, disc)
        return StagePlan(role, model, workers, b, lat, workers * b / lat)

    cascade_mode = mode == "cascade"
    return Plan(
        cascade=cascade.name,
        mode=mode,
        stages=(stage("light", cascade.light_model, light, b_light, cascade_mode),
                stage("heavy", cascade.heavy_model, heavy, b_heavy, False)),
        threshold=threshold if cascade_mode else 0.0,
        light_share=1.0 if cascade_mode else light_share,
        deferral_fraction=cascade.deferral(threshold) if cascade_mode else 1.0 - light_share,
        expected_fid=0.0,
        predicted_latency_s=0.0,
        demand_qps=0.0,
        gpus=light + heavy,
        feasible=True,
    )


class FixedPolicy:
    """Returns the same plan every time; records the inputs it was asked with."""

    name = "fixed"
    reads_peak_demand = False

    def __init__(self, plan: Plan):
        self._plan = plan
        self.inputs = []

    def plan(self, inp) -> Plan:
        self.inputs.append(inp)
        return self._plan


class ScriptedPolicy:
    """Returns the plans of a list in turn (the last one repeats): drives role switches in tests."""

    name = "scripted"
    reads_peak_demand = False

    def __init__(self, plans: list[Plan]):
        self._plans = list(plans)
        self.calls = 0
        self.inputs = []

    def plan(self, inp) -> Plan:
        self.inputs.append(inp)
        plan = self._plans[min(self.calls, len(self._plans) - 1)]
        self.calls += 1
        return plan
