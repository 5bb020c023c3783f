"""``diffsim load``: replay a trace against a running ``diffsim serve`` (open loop) and report it the way
``diffsim simulate`` does (summary.json, timeseries.csv, timeline.png, queries.csv, plans.csv)."""

from __future__ import annotations

from .. import limits
from .args import bounded, nonempty

import argparse
import json

DEFAULT_OUT = "out/load"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "load",
        help="open-loop load generator: replay a trace against a server, write simulate's reports",
        description=(
            "Send each trace request to URL/v1/images/generations at its arrival time, whatever the answers "
            "(open loop); record each outcome the server gives (completed, late, rejected 429/503, dropped "
            "504, failed), with deferral and times from the server's record whatever the status; poll "
            "URL/v1/plan for the plan history; write summary.json and timeseries.csv with the same keys as "
            "`diffsim simulate`, so sim and real runs compare side by side. Requests the client got no answer "
            "to (timeout, connection refused or reset) have no server outcome: 'unfinished' in summary.json, "
            "counted by kind in client.json with the client's own overhead (its latency minus the server's "
            "reported time). Times are on the client's clock, from the first request sent."
        ),
    )
    p.add_argument("--url", required=True, type=nonempty, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", required=True, type=nonempty, metavar="FILE", help="trace CSV (a path or a shipped name)")
    p.add_argument("--out", default=DEFAULT_OUT, type=nonempty, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--cascade", metavar="C", help="cascade whose quality curves score the run (default: the server's)")
    p.add_argument("--cascades", metavar="FILE", help="cascades file (default: the shipped one)")
    p.add_argument("--time-scale", type=limits.TIME_SCALE, default=1.0, metavar="X",
                   help="multiply the trace's arrival times by X (0.5 = twice as fast; default 1)")
    p.add_argument("--max-requests", type=limits.COUNT, metavar="N",
                   help=bounded("send only the first N requests", limits.COUNT))
    p.add_argument("--timeout-s", type=limits.PERIOD_S, default=60.0, metavar="S",
                   help=bounded("client timeout per request", limits.PERIOD_S, 60))
    p.add_argument("--api-key", metavar="KEY", help="bearer token, when the server wants one")
    p.add_argument("--poll-s", type=limits.PERIOD_S, default=1.0, metavar="S",
                   help=bounded("GET /v1/plan every S seconds", limits.PERIOD_S, 1))
    p.add_argument("--window-s", type=limits.WINDOW_S, default=10.0, metavar="S",
                   help=bounded("time-series window", limits.WINDOW_S, 10))
    p.add_argument("--no-plot", action="store_true", help="skip timeline.png")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..reports import metrics
    from ..errors import DiffsimError
    from ..workload.loadgen import cascade_for, client_report, run_load, server_info, write_results
    from ..resources import resolve_trace
    from ..workload.traces import read_trace
    from .simulate import format_summary

    if not args.poll_s > 0:
        raise DiffsimError(f"--poll-s: must be > 0, got {args.poll_s}")
    if not args.window_s > 0:
        raise DiffsimError(f"--window-s: must be > 0, got {args.window_s}")
    trace = read_trace(resolve_trace(args.trace))
    cascade_for(server_info(args.url, args.api_key), args.cascade, args.cascades)  # fail before sending
    raise_open_file_limit()
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
        print(format_client(client_report(result)))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def format_client(report: dict) -> str:
    """The client's side of the run, apart from the server's outcomes above."""
    codes = ", ".join(f"{k}: {v}" for k, v in report["http_status"].items()) or "none"
    errors = ", ".join(f"{k}: {v}" for k, v in report["client_errors"].items())
    lines = [f"  HTTP answers        {codes}",
             f"  client-side errors  {errors + ' (no answer: unfinished above)' if errors else 'none'}"]
    over, lag = report["client_overhead_ms"], report["send_lag_ms"]
    if over["n"]:
        lines.append(f"  client overhead     p50 {over['p50']:.1f} ms, p99 {over['p99']:.1f} ms (latency minus the "
                     f"server's total_ms, {over['n']} answers)")
    if lag["n"]:
        lines.append(f"  send lag            p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms behind the schedule")
    return "\n".join(lines)


def raise_open_file_limit() -> None:
    """Each open request holds a socket: lift the soft limit on open files to the hard one (often 1,024
    soft), so thousands of open requests do not fail client-side with 'too many open files'."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; errors, if any, are counted as client-side
