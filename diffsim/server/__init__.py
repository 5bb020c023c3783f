"""``diffsim serve``: the cascade served for real, over HTTP.

Layers, outermost first: :mod:`.http` (FastAPI: validation, status codes, JSON) -> :mod:`.engine` (the
wall-clock driver of the runtime layer) -> :mod:`.worker` (one executor per GPU / CPU slot, behind a
narrow async interface). :mod:`.startup` assembles them from :class:`~.startup.ServeOptions`;
:mod:`.prometheus` and :mod:`.quality_monitor` observe the engine.
"""
