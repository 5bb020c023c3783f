"""``diffsim load``: replay a trace against a running ``diffsim serve`` (open loop) and report it the way
``diffsim simulate`` does (summary.json, timeseries.csv, timeline.png, queries.csv, plans.csv)."""

from __future__ import annotations

import argparse
import json

DEFAULT_OUT = "out/load"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "load",
        help="open-loop load generator: replay a trace against a server, write simulate's reports",
        description=(
            "Send each trace request to URL/v1/images/generations at its arrival time, whatever the answers "
            "(open loop); record each outcome (completed, late, rejected 429, dropped 504, failed, client "
            "timeout); poll URL/v1/plan for the plan history; write summary.json and timeseries.csv with "
            "the same keys as `diffsim simulate`, so sim and real runs compare side by side. Times are on "
            "the client's clock, from the first request sent."
        ),
    )
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", required=True, metavar="FILE", help="trace CSV (a path or a shipped name)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--cascade", metavar="C", help="cascade whose quality curves score the run (default: the server's)")
    p.add_argument("--cascades", metavar="FILE", help="cascades file (default: the shipped one)")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                   help="multiply the trace's arrival times by X (0.5 = twice as fast; default 1)")
    p.add_argument("--max-requests", type=int, metavar="N", help="send only the first N requests")
    p.add_argument("--timeout-s", type=float, default=60.0, metavar="S", help="client timeout per request (default 60)")
    p.add_argument("--api-key", metavar="KEY", help="bearer token, when the server wants one")
    p.add_argument("--poll-s", type=float, default=1.0, metavar="S", help="GET /v1/plan every S seconds (default 1)")
    p.add_argument("--window-s", type=float, default=10.0, metavar="S", help="time-series window (default 10)")
    p.add_argument("--no-plot", action="store_true", help="skip timeline.png")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..reports import metrics
    from ..errors import DiffsimError
    from ..workload.loadgen import cascade_for, run_load, server_info, write_results
    from ..resources import resolve_trace
    from ..workload.traces import read_trace
    from .simulate import format_summary

    if not args.poll_s > 0:
        raise DiffsimError(f"--poll-s: must be > 0, got {args.poll_s}")
    if not args.window_s > 0:
        raise DiffsimError(f"--window-s: must be > 0, got {args.window_s}")
    trace = read_trace(resolve_trace(args.trace))
    cascade_for(server_info(args.url, args.api_key), args.cascade, args.cascades)  # fail before sending
    result = asyncio.run(run_load(args.url, trace, time_scale=args.time_scale, max_requests=args.max_requests,
                                  timeout_s=args.timeout_s, api_key=args.api_key, poll_s=args.poll_s))
    cascade = cascade_for(result.server, args.cascade, args.cascades)
    written = write_results(args.out, result, cascade, trace_name=str(args.trace), window_s=args.window_s,
                            plot=not args.no_plot)
    summary = json.loads((written[0]).read_text())
    if args.json:
        print(json.dumps(metrics.rounded(summary), sort_keys=True, indent=2))
    else:
        print(format_summary(summary))
        codes = ", ".join(f"{'no answer' if k == 0 else k}: {v}" for k, v in sorted(result.status_counts.items()))
        print(f"  HTTP answers        {codes}")
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
