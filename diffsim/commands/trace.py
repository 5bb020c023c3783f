"""``diffsim trace``: generate workload traces, describe them, and convert between formats.

    diffsim trace poisson --rate 9 --duration 60 --seed 1 --out static.csv
    diffsim trace gamma   --rate 9 --cv 3 --duration 60 --seed 1 --out bursty.csv
    diffsim trace shape   --builtin diurnal --lo 12 --hi 32 --intervals 360 --seed 0 --out dynamic.csv
    diffsim trace shape   --rates azure_hourly.txt --start 24 --intervals 120 --lo 4 --hi 30 --out az.csv
    diffsim trace info    traces/dynamic.csv
    diffsim trace convert artifact_trace.csv --out mine.csv --format diffsim
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import numpy as np

from .. import limits
from ..errors import DiffsimError
from .args import bounded, nonempty

WINDOWS_S = (1.0, 10.0)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=limits.SEED, default=0,
                   help=bounded("seed of numpy.random.default_rng", limits.SEED, 0))
    p.add_argument(
        "--prompt-ids",
        nargs=2,
        type=limits.PROMPT_ID,
        default=(1, 4999),
        metavar=("FIRST", "LAST"),
        help="prompt ids are drawn uniformly from FIRST..LAST inclusive (default 1 4999, as in the artifact)",
    )
    p.add_argument("--out", required=True, type=nonempty, help="trace file to write")
    p.add_argument(
        "--format",
        choices=("diffsim", "artifact"),
        default="diffsim",
        help="diffsim: header + arrival_s in seconds (default); artifact: arrival_ms,prompt_id lines",
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "trace",
        help="workload traces: generate (poisson, gamma, shape), describe (info), convert",
        description="Generate seeded workload traces (poisson, gamma, shape), describe a trace (info), or "
        "convert between the artifact's format and diffsim's (convert). Formats: traces/README.md. A generated "
        f"trace holds at most {limits.MAX_TRACE_REQUESTS:,} requests and lasts at most {limits.MAX_ARRIVAL_S:,.0f} s.",
    )
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    rate_help = bounded("mean arrival rate, queries per second; rate x duration at most "
                        f"{limits.MAX_TRACE_REQUESTS:,} requests", limits.RATE_QPS)
    g = sub.add_parser("poisson", help="constant-rate Poisson arrivals")
    g.add_argument("--rate", type=limits.RATE_QPS, required=True, help=rate_help)
    g.add_argument("--duration", type=limits.DURATION_S, required=True,
                   help=bounded("trace length, seconds", limits.DURATION_S))
    _output_options(g)

    g = sub.add_parser("gamma", help="bursty arrivals: Gamma inter-arrival times with a given cv")
    g.add_argument("--rate", type=limits.RATE_QPS, required=True, help=rate_help)
    g.add_argument(
        "--cv", type=limits.CV, required=True,
        help=bounded("coefficient of variation of the gaps (1 = Poisson)", limits.CV)
    )
    g.add_argument("--duration", type=limits.DURATION_S, required=True,
                   help=bounded("trace length, seconds", limits.DURATION_S))
    _output_options(g)

    g = sub.add_parser("shape", help="arrivals following a rate curve min-max scaled to [lo, hi] qps")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", help="a built-in curve: diurnal, ramp or step")
    src.add_argument("--rates", metavar="FILE", type=nonempty, help="a rate curve: one number per line, or a CSV column")
    g.add_argument("--column", help="with --rates: the CSV column, by header name or 1-based number")
    g.add_argument(
        "--start", type=limits.INTERVALS_OR_ZERO, default=0,
        help=bounded("with --rates: first interval of the file to use (0-based)", limits.INTERVALS_OR_ZERO, 0)
    )
    g.add_argument(
        "--intervals",
        type=limits.INTERVALS,
        help=bounded("number of intervals: the built-in curve is sampled at this many points (default 360); "
                     "with --rates, how many of the file's intervals to use from --start (default: all)",
                     limits.INTERVALS),
    )
    g.add_argument("--interval-s", type=limits.DURATION_S, default=1.0,
                   help=bounded("seconds per interval; intervals x interval-s at most "
                                f"{limits.MAX_ARRIVAL_S:,.0f} s", limits.DURATION_S, 1))
    g.add_argument("--lo", type=limits.RATE_OR_ZERO, required=True,
                   help=bounded("rate of the curve's minimum, qps", limits.RATE_OR_ZERO))
    g.add_argument("--hi", type=limits.RATE_OR_ZERO, required=True,
                   help=bounded("rate of the curve's maximum, qps", limits.RATE_OR_ZERO))
    _output_options(g)

    g = sub.add_parser("info", help="count, duration, mean and peak rates, prompt-id range")
    g.add_argument("file", type=nonempty, help="trace file (a path, or the name of a shipped trace such as dynamic.csv)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    g = sub.add_parser("convert", help="rewrite a trace in the other format")
    g.add_argument("file", type=nonempty, help="trace file to read (either format)")
    g.add_argument("--out", required=True, type=nonempty, help="trace file to write")
    g.add_argument(
        "--format", choices=("diffsim", "artifact"), default="diffsim", help="output format (default diffsim)"
    )
    g.add_argument(
        "--drop-prompts",
        action="store_true",
        help="allow writing the artifact format from a trace with prompt texts or seeds (they are left out)",
    )


def _shape_rates(args) -> np.ndarray:
    from ..workload.trace_generators import builtin_shape, read_rates

    if args.builtin is not None:
        if args.column is not None or args.start:
            raise DiffsimError("--column and --start apply to --rates FILE, not to --builtin")
        return builtin_shape(args.builtin, args.intervals or 360)
    rates = read_rates(args.rates, column=args.column)
    stop = len(rates) if args.intervals is None else args.start + args.intervals
    if args.start >= len(rates) or stop > len(rates):
        raise DiffsimError(
            f"{args.rates}: has {len(rates)} intervals; --start {args.start} --intervals "
            f"{args.intervals or len(rates) - args.start} asks for intervals {args.start}..{stop - 1}"
        )
    return rates[args.start : stop]


def _generate(args):
    from ..workload.trace_generators import gamma_trace, poisson_trace, shape_trace

    ids = tuple(args.prompt_ids)
    if args.trace_command == "poisson":
        return poisson_trace(args.rate, args.duration, seed=args.seed, prompt_ids=ids)
    if args.trace_command == "gamma":
        return gamma_trace(args.rate, args.cv, args.duration, seed=args.seed, prompt_ids=ids)
    if args.lo > args.hi:
        raise DiffsimError(f"--lo {args.lo:g} is above --hi {args.hi:g}")
    return shape_trace(_shape_rates(args), args.lo, args.hi, interval_s=args.interval_s, seed=args.seed, prompt_ids=ids)


def file_stats(path, chunk_rows: Optional[int] = None):
    """The figures of a trace file, read in chunks (memory does not grow with its length), with a
    progress bar on a terminal (:mod:`diffsim.progress`) for files that take more than a second."""
    from ..progress import progress_bar
    from ..workload.traces import DEFAULT_CHUNK_ROWS, TraceStats, file_size, trace_chunks

    stats = TraceStats(WINDOWS_S)
    with progress_bar(total=file_size(path), desc="reading", unit="B", unit_scale=True, delay=1.0) as bar:
        for chunk in trace_chunks(path, chunk_rows or DEFAULT_CHUNK_ROWS):
            stats.add(chunk)
            bar.update(min(chunk.chars_read, bar.total) - bar.n)  # characters: bytes for ASCII text
    return stats


def describe(stats, source: str) -> dict:
    """The figures ``diffsim trace info`` prints, from a :class:`~diffsim.workload.traces.TraceStats`."""
    info = {
        "source": source,
        "requests": stats.requests,
        "duration_s": round(stats.duration_s, 6),
        "mean_rate_qps": round(stats.mean_rate_qps, 4),
        "has_prompts": stats.has_prompts,
        "has_seeds": stats.has_seeds,
        "prompt_id_min": stats.prompt_id_min,
        "prompt_id_max": stats.prompt_id_max,
        "distinct_prompt_ids": stats.distinct_prompt_ids,
    }
    for w in WINDOWS_S:
        counts = stats.windows[w].counts
        info[f"windows_{w:g}s"] = {
            "mean_qps": round(float(counts.mean()) / w, 4),
            "peak_qps": round(float(counts.max()) / w, 4),
            "min_qps": round(float(counts.min()) / w, 4),
        }
    return info


def convert(src, dst, fmt: str, *, drop_extra: bool, chunk_rows: Optional[int] = None) -> int:
    """``diffsim trace convert``: :func:`~diffsim.workload.traces.convert_trace` with a progress bar per
    stage on a terminal (reading; for an unsorted file, sorting chunks and merging them)."""
    from ..progress import progress_bar
    from ..workload.traces import DEFAULT_CHUNK_ROWS, convert_trace

    bars: dict = {}
    labels = {"read": ("converting", "B"), "sort": ("sorting chunks", "B"), "merge": ("merging", "rows")}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            desc, unit = labels[stage]
            bars[stage] = progress_bar(total=total, desc=desc, unit=unit, unit_scale=True, delay=1.0)
        bar = bars[stage]
        bar.update(min(done, bar.total) - bar.n)

    try:
        return convert_trace(src, dst, fmt, drop_extra=drop_extra, chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS,
                             progress=progress)
    finally:
        for bar in bars.values():
            bar.close()


def _print_info(info: dict) -> None:
    print(f"trace        {info['source']}")
    print(f"requests     {info['requests']}")
    print(f"duration     {info['duration_s']:.3f} s (time of the last arrival)")
    print(f"mean rate    {info['mean_rate_qps']:.3f} qps")
    for w in WINDOWS_S:
        win = info[f"windows_{w:g}s"]
        print(
            f"{w:g} s windows".ljust(13)
            + f"mean {win['mean_qps']:.3f} qps, peak {win['peak_qps']:.3f} qps, min {win['min_qps']:.3f} qps"
        )
    print(
        f"prompt ids   {info['prompt_id_min']}..{info['prompt_id_max']} "
        f"({info['distinct_prompt_ids']} distinct)"
    )
    yes_no = {True: "yes", False: "no"}
    print(f"columns      prompt texts: {yes_no[info['has_prompts']]}, seeds: {yes_no[info['has_seeds']]}")


def run(args) -> int:
    from ..resources import resolve_trace
    from ..workload.traces import write_trace

    if args.trace_command == "info":
        path = resolve_trace(args.file)
        info = describe(file_stats(path), str(path))
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _print_info(info)
        return 0
    if args.trace_command == "convert":
        n = convert(resolve_trace(args.file), args.out, args.format, drop_extra=args.drop_prompts)
        print(f"wrote {n} requests in the {args.format} format to {args.out}")
        return 0

    trace = _generate(args)
    if not len(trace):
        raise DiffsimError("the generated trace has no requests; raise the rate or the duration")
    write_trace(trace, args.out, args.format)
    print(
        f"wrote {len(trace)} requests over {trace.duration_s:.1f} s "
        f"(mean {trace.mean_rate_qps:.2f} qps) to {args.out}"
    )
    return 0
