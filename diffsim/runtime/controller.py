"""The control loop's decisions, without a clock: when to re-plan and with which inputs.

A driver (the simulator or the server) calls :meth:`Controller.on_tick` once per tick (default 1 s) with
what it measured over that tick. The controller

* feeds the demand estimator (EWMA x head-room, :mod:`diffsim.runtime.demand`) the tick's sample: its
  arrival rate (``demand: arrival``, the default) or the number of queries in the system, which the
  driver hands in as ``in_system`` (``demand: in-system``, the DiffServe artifact's estimator);
* re-plans at the first tick and then whenever ``replan_s`` (default 5 s) has passed since the last
  plan, asking the policy with ``PolicyInput(demand, queue_delay_s, gpus, queue_lengths)``, where the
  per-stage queueing delay is Little's law, W = L / lambda: the mean queue length over the ticks since
  the last plan divided by the mean arrival rate into that stage over the same ticks (0 when nothing
  arrived). Averaging over the re-plan period rather than taking one tick's snapshot matters: a stage
  that sees a handful of arrivals per second gives a one-tick estimate that swings by seconds, and the
  allocator would swing with it. ``queue_lengths`` is the re-plan tick's own queue per stage (the
  backlog a new plan must drain: a policy with a plan-dependent delay model, see
  :mod:`diffsim.runtime.queueing`, plans for it and never leaves it without a worker);
* re-plans at once, whatever the period, when the number of workers in service changed (a worker was
  lost, taken out, or came back: :mod:`diffsim.runtime.health`), for the workers that remain;
* for a policy that reads it (``policy.reads_peak_demand``: the MILP policies with a plan-dependent
  delay), remembers the demand of each plan it asked for over the last ``stabilization_s`` (default 60 s)
  and hands the policy the highest of them with this re-plan's (``PolicyInput.peak_demand_qps``; None for
  other policies): a policy with re-planning hysteresis moves GPUs between the stages only to a split that
  carries that demand too, as a Kubernetes autoscaler scales down only to the highest recommendation of
  its stabilisation window (:meth:`diffsim.policies.MilpPolicy._keep_split`);
* returns the plan to apply, or None.

The initial plan (:meth:`Controller.initial_plan`, at the start, before any arrival) is made for
``initial_demand_qps`` x head-room with no queueing delay; nothing of the trace is looked at ahead.
Because that demand is a guess, the first re-plan comes at the first tick instead of after a whole
re-plan period.

A plan that runs no worker at all (``gpus_used == 0``, e.g. the policy had no GPU to give) is not
applied: the previous plan stays, so queued work keeps being served. With no worker in service the
policy is not asked at all.

The re-plan period is checked with a tolerance of half a tick: a driver on the wall clock ticks a little
late every time, and ``now - last >= replan_s`` alone would then re-plan every ``replan_s + tick_s``.

Idle time (the simulator's long gaps between arrivals): once the controller is :meth:`~Controller.idle_steady`
-- the EWMA holds only zero samples and the policy was last asked exactly what an idle re-plan would ask
(for a policy that reads the window, a peak of 0 too: up to ``stabilization_s`` of idle re-plans first)
-- further idle ticks change nothing but the clock, and :meth:`Controller.on_idle_ticks` takes any
number of them at once without asking the policy again. Policies are pure (:mod:`diffsim.policies`): the same
input gives the same plan, so the result is the one ticking one by one would give.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple, Optional, Sequence

from ..config import ControllerConfig
from .demand import DemandEstimator
from ..plan import Plan
from ..policies import PolicyInput


def little_delay_s(queue_length: float, arrival_rate_qps: float) -> float:
    """Little's law: the mean wait of a queue is its length over its arrival rate (0 with no arrivals)."""
    if arrival_rate_qps <= 0:
        return 0.0
    return queue_length / arrival_rate_qps


class SavedState(NamedTuple):
    """A :meth:`Controller.state`, read (:func:`read_state`), its times on the reader's clock."""

    plan: Plan
    since_plan_s: float
    ticks: int
    window_ticks: int
    queue_sum: list[float]
    rate_sum: list[float]
    samples: list[float]  # the demand EWMA's, oldest first
    rate_qps: float
    queue_delay_s: tuple[float, float]
    queue_lengths: tuple[int, int]
    demands: list[tuple[float, float]]  # the stabilisation window's (time, demand), oldest first


def read_state(state: dict, now: float = 0.0) -> SavedState:
    """A :meth:`Controller.state` taken at ``now`` on the reader's clock, checked (ValueError with one line
    otherwise)."""
    try:
        plan = Plan.from_dict(state["plan"])
        since = float(state["since_plan_s"])
        ticks = int(state["ticks"])
        window = int(state["window_ticks"])
        queue_sum = [float(x) for x in state["queue_sum"]]
        rate_sum = [float(x) for x in state["rate_sum"]]
        samples = [float(x) for x in state["samples"]]
        rate = float(state["rate_qps"])
        delay = (float(state["queue_delay_s"][0]), float(state["queue_delay_s"][1]))
        lengths = (int(state["queue_lengths"][0]), int(state["queue_lengths"][1]))
        ages = [(float(age), float(d)) for age, d in state.get("demands", ())]  # older states: none
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a controller state: {type(e).__name__}: {e}") from None
    if any(not (math.isfinite(age) and 0 <= d < math.inf) for age, d in ages) \
            or any(a < b for (a, _), (b, _) in zip(ages, ages[1:])):
        raise ValueError("not a controller state: remembered demands must be finite, >= 0 and oldest first")
    demands = [(now - age, d) for age, d in ages]
    if len(queue_sum) != 2 or len(rate_sum) != 2 or ticks < 0 or window < 0:
        raise ValueError("not a controller state: two stages' sums and counts >= 0")
    if any(not x >= 0 for x in samples):
        raise ValueError(f"not a controller state: demand samples must be >= 0, got {samples!r}")
    return SavedState(plan, since, ticks, window, queue_sum, rate_sum, samples, rate, delay, lengths, demands)


class Controller:
    """Demand estimate and re-plan schedule around one policy (anything with ``plan(PolicyInput)`` and
    ``reads_peak_demand``: :class:`diffsim.policies.Policy`)."""

    def __init__(self, policy, gpus: int, config: ControllerConfig = ControllerConfig()):
        self.policy = policy
        self.gpus = gpus
        self.config = config
        self.estimator = DemandEstimator(config.ewma_alpha, config.ewma_window, config.headroom)  # of config.demand
        self.plan: Optional[Plan] = None  # the plan in force
        self.last_plan_s: Optional[float] = None
        self.ticks = 0
        self.rate_qps = 0.0  # arrival rate measured over the last tick
        self.queue_delay_s: tuple[float, float] = (0.0, 0.0)  # the estimate the last re-plan used
        self.queue_lengths: tuple[int, int] = (0, 0)  # queued per stage at the last tick
        self._window_ticks = 0  # ticks since the last plan, and sums over them:
        self._queue_sum = [0.0, 0.0]  # queue length samples per stage
        self._rate_sum = [0.0, 0.0]  # arrival rates per stage
        self._asked: Optional[PolicyInput] = None  # the policy's last input, and its answer
        self._answer: Optional[Plan] = None
        # (time, demand) of the plans asked for within the stabilisation window that no later one has
        # matched or exceeded: oldest first, demands decreasing, so the first is the window's peak
        self._window_s = config.stabilization_s if policy.reads_peak_demand else None
        self._demands: deque[tuple[float, float]] = deque()

    @property
    def demand_qps(self) -> float:
        """Demand the next plan is made for: the EWMA estimate (or the initial guess) x head-room."""
        return self.estimator.demand_qps(self.config.initial_demand_qps)

    def initial_plan(self, now: float = 0.0) -> Plan:
        """The plan to start with; always applied (even if it uses no worker)."""
        plan = self._ask(self.demand_qps, (0.0, 0.0), now=now)
        self.plan = plan
        self.last_plan_s = now
        return plan

    def state(self, now: float) -> dict:
        """Everything the next ticks depend on, times relative to ``now``: the plan in force, how long ago
        it was made, the tick count, the demand samples held (oldest first), the last tick's measurements
        and delay estimate, the sums the next re-plan's queueing delay is taken from, and the demands its
        stabilisation window remembers (as ages, oldest first). A server reports
        it (``GET /v1/plan``) so that ``diffsim validate`` can start a simulation where the server stood
        (:meth:`resume`)."""
        return {
            "plan": None if self.plan is None else self.plan.to_dict(),
            "since_plan_s": None if self.last_plan_s is None else now - self.last_plan_s,
            "ticks": self.ticks,
            "samples": self.estimator.held(),
            "rate_qps": self.rate_qps,
            "queue_delay_s": list(self.queue_delay_s),
            "queue_lengths": list(self.queue_lengths),
            "window_ticks": self._window_ticks,
            "queue_sum": list(self._queue_sum),
            "rate_sum": list(self._rate_sum),
            "demands": [[now - t, d] for t, d in self._demands],
        }

    def resume(self, state: dict, now: float = 0.0) -> Plan:
        """Take up where :meth:`state` left another controller, at ``now`` on this one's clock; returns the
        plan in force (to apply, as :meth:`initial_plan`'s). The next re-plan falls where it would have
        (``replan_s`` after that plan was made), not at the first tick."""
        saved = read_state(state, now)
        self.estimator.restore(saved.samples)
        self.plan, self.last_plan_s, self.ticks = saved.plan, now - saved.since_plan_s, saved.ticks
        self._window_ticks, self._queue_sum, self._rate_sum = saved.window_ticks, saved.queue_sum, saved.rate_sum
        self.rate_qps, self.queue_delay_s, self.queue_lengths = saved.rate_qps, saved.queue_delay_s, saved.queue_lengths
        self._demands = deque()
        if self._window_s is not None:
            for t, d in saved.demands:
                self._push(t, d)
        self._asked = self._answer = None  # the policy has not been asked here yet
        return saved.plan

    def on_tick(
        self,
        now: float,
        arrivals_in_tick: int,
        queue_lengths_by_stage: Sequence[int],
        stage_arrival_rates: Sequence[float],
        gpus: Optional[int] = None,
        *,
        in_system: Optional[int] = None,
    ) -> Optional[Plan]:
        """One tick: update the demand estimate; on a re-plan tick return the plan to apply.

        ``gpus``: the workers in service now (None: unchanged). A change re-plans at this tick.
        ``in_system``: queries admitted and not yet ended at this tick (the dispatcher's ``holding()``);
        required with ``demand: in-system``, unused otherwise."""
        if self.plan is None:
            raise RuntimeError("Controller.initial_plan() must be called before the first tick")
        self.ticks += 1
        self.rate_qps = arrivals_in_tick / self.config.tick_s
        if self.config.demand == "in-system":
            if in_system is None:
                raise ValueError("demand 'in-system' needs the number of queries in the system at each tick "
                                 "(on_tick(..., in_system=...))")
            self.estimator.update(in_system)
        else:
            self.estimator.update(self.rate_qps)
        self.queue_lengths = (int(queue_lengths_by_stage[0]), int(queue_lengths_by_stage[1]))
        self._window_ticks += 1
        for i in (0, 1):
            self._queue_sum[i] += queue_lengths_by_stage[i]
            self._rate_sum[i] += stage_arrival_rates[i]
        resized = gpus is not None and gpus != self.gpus
        if resized:
            self.gpus = gpus
        if not (resized or self.replan_due(now)):
            return None
        self.last_plan_s = now
        n = self._window_ticks
        self.queue_delay_s = tuple(  # type: ignore[assignment]
            little_delay_s(self._queue_sum[i] / n, self._rate_sum[i] / n) for i in (0, 1)
        )
        self._window_ticks = 0
        self._queue_sum = [0.0, 0.0]
        self._rate_sum = [0.0, 0.0]
        if self.gpus < 1:
            return None
        plan = self._ask(self.demand_qps, self.queue_delay_s, self.queue_lengths, now=now)
        if plan.gpus_used == 0:
            return None
        self.plan = plan
        return plan

    def replan_due(self, now: float) -> bool:
        """True at the first tick, then once ``replan_s`` has passed since the last plan."""
        if self.ticks == 1:
            return True
        # Half a tick of tolerance: float tick times (k * tick_s) hit the period exactly, and wall-clock
        # ticks that come a little late do not push every re-plan one tick further.
        return now - self.last_plan_s >= self.config.replan_s - 0.5 * self.config.tick_s

    def idle_steady(self) -> bool:
        """Whether idle ticks -- no arrival, nothing queued or in the system, the same workers in service --
        would from now on change nothing but the clock: every one gives the same demand (the EWMA holds only
        zeros), and every re-plan asks the policy what it was last asked (zero demand and queueing delay, an
        empty queue, the plan in force), so it returns the same plan."""
        if self._asked is None or self.ticks == 0 or not self.estimator.all_zero:
            return False
        if any(self._queue_sum) or any(self._rate_sum):  # the next re-plan's delay would not be 0
            return False
        if self.gpus < 1:  # re-plans ask nothing
            return True
        # With a stabilisation window this also waits for the busy demands to leave it: the last input's
        # peak is 0 (as an idle re-plan's) only once every demand remembered is 0.
        return self._asked == self._idle_input()

    def on_idle_ticks(self, times: Sequence[float]) -> list[tuple[float, Plan]]:
        """Idle ticks at ``times`` (ascending, after the last tick), taken at once: the same state and
        plans as ``on_tick(t, 0, (0, 0), (0.0, 0.0), in_system=0)`` for each ``t`` in turn, with the
        policy not asked again. Only while :meth:`idle_steady`. Returns the re-plans among them as
        ``(time, plan)``: the plan in force each time (none when the policy's answer is not applied)."""
        if not self.idle_steady():
            raise RuntimeError("on_idle_ticks needs an idle-steady controller (see idle_steady)")
        if not times:
            return []
        self.ticks += len(times)
        self.rate_qps = 0.0
        self.estimator.add_zeros(len(times))
        self.queue_lengths = (0, 0)
        due = self.config.replan_s - 0.5 * self.config.tick_s  # as replan_due
        last = self.last_plan_s
        window = self._window_ticks
        replans = []
        for t in times:
            window += 1
            if t - last >= due:
                last = t
                window = 0
                replans.append(t)
        self.last_plan_s = last
        self._window_ticks = window
        if not replans:
            return []
        self.queue_delay_s = (little_delay_s(0.0, 0.0), little_delay_s(0.0, 0.0))
        if self.gpus >= 1:  # the re-plans' demand (0) remembered, as on_tick would ask it: every demand held
            self._remember(replans[-1], self.demand_qps)  # is 0 here, so the last re-plan's 0 replaces them all
        if self.gpus < 1 or self._answer.gpus_used == 0:
            return []
        self.plan = self._answer
        return [(t, self.plan) for t in replans]

    def _idle_input(self) -> PolicyInput:
        """What a re-plan at an idle tick asks the policy, once the EWMA and the delay sums are at zero."""
        return PolicyInput(demand_qps=self.demand_qps, queue_delay_s=(0.0, 0.0), gpus=self.gpus,
                           queue_lengths=(0, 0), current=self.plan,
                           peak_demand_qps=None if self._window_s is None else self.demand_qps)

    def _remember(self, now: float, demand_qps: float) -> Optional[float]:
        """Remember ``demand_qps`` as asked for at ``now``, forget what is older than the window, and
        return the highest demand remembered (None: the policy reads no window, nothing is remembered)."""
        if self._window_s is None:
            return None
        demands = self._demands
        # half a tick of tolerance, as replan_due: a demand a whole window old leaves it, whatever the
        # rounding of float tick times (or of times taken over from another clock, resume)
        edge = now - self._window_s + 0.5 * self.config.tick_s
        while demands and demands[0][0] <= edge:
            demands.popleft()
        self._push(now, demand_qps)
        return demands[0][1]

    def _push(self, t: float, demand_qps: float) -> None:
        """Remember ``demand_qps`` at ``t``, forgetting the earlier demands it matches or exceeds (they can
        no longer be the window's peak)."""
        demands = self._demands
        while demands and demands[-1][1] <= demand_qps:
            demands.pop()
        demands.append((t, demand_qps))

    def _ask(self, demand_qps: float, queue_delay_s: tuple[float, float],
             queue_lengths: tuple[int, int] = (0, 0), *, now: float) -> Plan:
        inp = PolicyInput(demand_qps=demand_qps, queue_delay_s=queue_delay_s, gpus=self.gpus,
                          queue_lengths=queue_lengths, current=self.plan,
                          peak_demand_qps=self._remember(now, demand_qps))
        self._asked, self._answer = inp, self.policy.plan(inp)
        return self._answer
