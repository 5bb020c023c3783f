"""The runtime layer both drivers share: every serving rule, and no clock, I/O, thread or torch.

A driver (:mod:`diffsim.simulator` on SimPy time, :mod:`diffsim.server.engine` on the wall clock) holds
one :class:`~diffsim.runtime.dispatcher.Dispatcher` and one :class:`~diffsim.runtime.controller.Controller`
and only tells them what happened and when (``now`` is always an argument):

* a query arrives -> ``Dispatcher.admit``; wake the worker it names;
* a worker is free -> ``Dispatcher.take_batch``; run the batch (wait its profile time, or execute it);
* the batch ends -> ``Dispatcher.complete_batch`` (or ``fail_batch``); wake the workers it names;
* every tick -> ``Dispatcher.expire_backlog``, ``tick_stats`` into ``Controller.on_tick``, and
  ``Dispatcher.apply_plan`` with the plan it returns.

The rules: demand estimation (:mod:`.demand`), re-planning (:mod:`.controller`), routing and deferral
(:mod:`.routing`), batch formation and the drop rule (:mod:`.batching`), role assignment (:mod:`.roles`),
per-prompt confidences (:mod:`.confidence`), admission (:mod:`.admission`).
"""
