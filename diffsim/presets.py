"""Named sets of run settings: ``--preset NAME`` (or ``preset: NAME`` in a config file).

A preset fills in settings the run does not give itself: diffsim's defaults < the preset < the config
file < the command-line flags, so ``--preset artifact --routing least-loaded`` is the artifact with one
thing changed. Keys are those of the config file (:mod:`diffsim.config`); ``controller`` is filled key
by key.

``artifact`` -- every setting as the DiffServe artifact (arXiv 2411.15381) has it, so that its results
can be reproduced before diffsim's own choices are compared with them:

* routing ``random``: each query to a uniformly random worker of its stage (the testbed's load balancer,
  ``shared/reference/diffserve_artifact.yaml``, testbed.routing);
* ``max_utilization`` 1: the MILP's capacity constraint is capacity >= demand, nothing held back;
* ``demand: in-system`` with ``headroom`` 1.2: the artifact's controller plans for 1.2 x an EWMA
  (pandas ``ewm(com=2.1)``, 20 one-second samples) of the queries in the system, not of the arrival
  rate (:mod:`diffsim.runtime.demand`; issue 13 of this project describes the artifact's
  ``computeSystemEWMA``);
* ``queue_model: little``: one Little's-law queueing delay per stage, measured under the plan in force
  and taken off the SLO for every candidate plan (:mod:`diffsim.runtime.controller`);
* the drop rule: a query is dropped at dequeue when elapsed + batch time would pass 1.5 x SLO
  (``drop_factor`` 1.5; testbed.drop_on_dequeue), no admission at the door, no deadline sweep;
* eager batching (``batch_timeout_s`` 0), both models resident on every GPU (``swap_s`` 0), batch sizes
  1..32, a tick of 1 s and a re-plan every 5 s (testbed.*), batch times at the profile's p50 (the artifact
  profiles p50 = p90 = p95);
* the static baseline: the paper's plan for 16 GPUs (baselines.diffserve-static). The reference gives no
  plan for other GPU counts, so at 8 or 12 GPUs it is that plan scaled to the GPU count with its
  light:heavy ratio (:class:`diffsim.policies.FixedPolicy`), as diffsim always does: that part is diffsim's
  reading, not the artifact's.

The MILP's objective is the policy's: ``diffserve-maxt`` maximises the threshold as the paper's MILP does,
``diffserve`` minimises the expected FID; a preset does not choose the policy.
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import SettingError
from .runtime.demand import ARTIFACT_HEADROOM

PRESETS: dict[str, dict[str, Any]] = {
    "artifact": {
        "routing": "random",
        "max_utilization": 1.0,
        "batch_wait": 0.0,
        "queue_model": "little",
        "demand": "in-system",
        "controller": {"tick_s": 1.0, "replan_s": 5.0, "ewma_alpha": 1 / 3.1, "ewma_window": 20,
                       "headroom": ARTIFACT_HEADROOM},
        "drop_factor": 1.5,
        "batch_timeout_s": 0.0,
        "swap_s": 0.0,
        "batch_sizes": [1, 2, 4, 8, 16, 32],
        "admission": False,
        "deadline_sweep_s": 0.0,
        "service_time": "p50",
    },
}
PRESET_NAMES = tuple(PRESETS)


def apply_preset(name: Optional[str], settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the preset's values under them (a new dict; ``settings`` wins key by key, and
    within ``controller``). None: no preset."""
    if name is None:
        return dict(settings)
    if name not in PRESETS:
        raise SettingError("preset", f"unknown preset {name!r} (choose from {', '.join(PRESET_NAMES)})")
    preset = PRESETS[name]
    merged = {**preset, **settings}
    if "controller" in preset:
        merged["controller"] = {**preset["controller"], **(settings.get("controller") or {})}
    if "batch_sizes" in merged:
        merged["batch_sizes"] = list(merged["batch_sizes"])
    return merged
