"""The first run on a GPU: one command that exercises the whole CUDA path and prints what it measured.

    .venv/bin/python benchmarks/gpu_smoke.py                      # everything (~10 min on one H100-class GPU)
    .venv/bin/python benchmarks/gpu_smoke.py --only models,oom    # some sections
    .venv/bin/python benchmarks/gpu_smoke.py --out smoke.json     # the figures as JSON too

Sections (random weights throughout: no model hub needed, and latency does not depend on weight values):

* ``models`` -- each of the five models on GPU 0 in fp16: load time, then batches of 1, 4 and 16 images
  (``--batch-sizes``) timed as ``diffsim profile`` times them (warm-up, then timed calls between device
  synchronisations; a batch that runs out of memory is null and larger ones are skipped), peak memory,
  the PNG encoding of one batch, and checks: image size, images that differ, the VAE back in fp16,
  SDXL-class decodes sliced.
* ``discriminator`` -- the EfficientNet-V2-S discriminator (fp32, 224 px) on batches of those sizes.
* ``oom`` -- SDXL-Lightning: a *real* out-of-memory (the process's share of the GPU capped just above what
  the loaded model holds, then a batch of 8), an OOM *simulated* in the fp32 VAE decode, and after each a
  normal batch that must give the same image as before, with the VAE in fp16 and the memory given back.
* ``workers`` -- two workers on two GPUs (needs two; skipped with one): a server on the cuda backend
  (sdturbo-sdv15, a static plan with one light and one heavy worker, threshold 1.0 so every request uses
  both GPUs), as threads of one process and, when Ray is installed, as Ray actors (``--ray local``); each
  answers concurrent requests and both GPUs must have run batches.
* ``compile`` (only when asked: ``--only compile`` or ``--compile``) -- SD-Turbo then SDXL-Lightning with
  ``torch.compile(mode="reduce-overhead")`` one after the other in this process: compile time, latency
  against eager, and whether any UNet call ran eagerly (it must not).

Without CUDA it refuses at once: one line on stderr, exit status 2. It never changes the GPU's settings
(the memory cap of the ``oom`` section is this process's allocator limit, lifted afterwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

SECTIONS = ("models", "discriminator", "oom", "workers", "compile")
DEFAULT_SECTIONS = ("models", "discriminator", "oom", "workers")
MODELS = ("sd-turbo", "sdxs", "sd-v1.5", "sdxl-lightning", "sdxl")
PROMPT = "a photograph of an astronaut riding a horse on the moon"
GIB = 1024**3
REFUSED = 2  # exit status without CUDA (or torch)

failed_checks: list[str] = []  # every check that failed, reported at the end (exit status 1)


class Refused(Exception):
    """This machine cannot run the smoke test (no torch, no CUDA device)."""


def require_cuda():
    """torch, after checking that a CUDA device is usable; :class:`Refused` otherwise."""
    try:
        import torch
    except ImportError:
        raise Refused("torch is not installed (pip install -e '.[cuda]')") from None
    if not torch.cuda.is_available():
        raise Refused("no CUDA device (torch.cuda.is_available() is False): nothing to measure here; "
                      "run this on a machine with an NVIDIA GPU")
    return torch


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Exercise the cuda backend end to end and print what it measured.")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all but compile)")
    p.add_argument("--compile", action="store_true", help="add the compile section")
    p.add_argument("--models", default=",".join(MODELS), help="models of the models section")
    p.add_argument("--batch-sizes", default="1,4,16", help="batch sizes (default 1,4,16)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size (default 1)")
    p.add_argument("--iters", type=int, default=2, help="timed calls per batch size (default 2)")
    p.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()] + (["compile"] if args.compile else [])
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown model(s) {', '.join(bad)} (known: {', '.join(MODELS)})")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error("--batch-sizes: expected integers such as 1,4,16")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.warmup < 0 or args.iters < 1:
        p.error("--batch-sizes must be >= 1, --warmup >= 0, --iters >= 1")
    return args


def say(line: str) -> None:
    print(line, flush=True)


def check(ok: bool, what: str) -> bool:
    """Record a check; a failed one is printed now and makes the run's exit status 1."""
    if not ok:
        failed_checks.append(what)
        say(f"  << CHECK FAILED: {what}")
    return ok


# ----------------------------------------------------------------------------------------------
# Sections


def environment(torch) -> dict:
    from diffsim.profiling.profiler import software_versions

    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / GIB, 1)})
    info = {"software": software_versions("cuda"), "devices": devices}
    say(f"[env] {len(devices)} GPU(s): " + "; ".join(f"cuda:{d['index']} {d['name']} {d['memory_gib']} GiB"
                                                      for d in devices))
    say("[env] " + ", ".join(f"{k} {v}" for k, v in info["software"].items()))
    return info


def prompts(n: int) -> tuple[list[str], list[int]]:
    return [f"{PROMPT}, take {i}" for i in range(n)], list(range(n))


def section_models(torch, args) -> dict:
    from backends import make_executor

    results = {}
    for model in args.models:
        ex = make_executor("cuda", model, weights="random", device=0, discriminator=False)
        try:
            results[model] = _one_model(ex, model, args)
        except Exception as e:  # noqa: BLE001 - one model's failure must not hide the others' figures
            results[model] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
            check(False, f"{model}: {type(e).__name__}: {e}")
        finally:
            ex.unload()
    return results


def _one_model(ex, model: str, args) -> dict:
    """Load one model, time its batches, check its images and its VAE; its figures."""
    import numpy as np

    from backends.base import encode_pngs
    from diffsim.profiling.profiler import measure_batch

    t0 = time.perf_counter()
    ex.load()
    row: dict = {"load_s": round(time.perf_counter() - t0, 2), "batches": {}}
    say(f"[models] {model}: loaded in {row['load_s']} s, {ex.memory().in_use_bytes / GIB:.2f} GiB")
    skip = False
    for b in args.batch_sizes:
        if skip:
            row["batches"][b] = None
            say(f"[models] {model} b={b}: skipped (a smaller batch ran out of memory)")
            continue
        texts, seeds = prompts(b)
        images: list = []

        def call() -> None:
            images[:] = ex.generate(texts, seeds)  # the last call's images are checked below

        samples, peak = measure_batch(ex, call, warmup=args.warmup, iters=args.iters)
        if samples is None:
            row["batches"][b] = None
            skip = True
            say(f"[models] {model} b={b}: out of memory")
            continue
        t0 = time.perf_counter()
        pngs = encode_pngs(images)
        png_ms = (time.perf_counter() - t0) * 1000
        size = ex.spec.resolution
        sizes_ok = all(img.size == (size, size) for img in images)
        distinct = b == 1 or len({p for p in pngs}) == b
        entry = {"p50_ms": round(float(np.median(samples)), 1), "max_ms": round(max(samples), 1),
                 "peak_gib": None if peak is None else round(peak, 2), "png_ms": round(png_ms, 1),
                 "png_kib_each": round(sum(map(len, pngs)) / b / 1024, 1), "sizes_ok": sizes_ok,
                 "distinct_images": distinct}
        row["batches"][b] = entry
        say(f"[models] {model} b={b}: p50 {entry['p50_ms']} ms, peak {entry['peak_gib']} GiB, PNG encoding "
            f"{entry['png_ms']:.0f} ms ({entry['png_kib_each']} KiB each)")
        check(sizes_ok, f"{model} b={b}: images of {size}x{size}")
        check(distinct, f"{model} b={b}: a different image per seed")
    vae = ex._pipe.vae
    row["vae_dtype"] = str(vae.dtype).replace("torch.", "")
    row["vae_slicing"] = bool(getattr(vae, "use_slicing", False))
    row["first_timestep"] = _first_timestep(ex)
    say(f"[models] {model}: VAE {row['vae_dtype']} (sliced decode: {row['vae_slicing']}), "
        f"first timestep {row['first_timestep']}")
    check(row["vae_dtype"] == "float16", f"{model}: VAE back in fp16 after its batches")
    check(row["vae_slicing"] == (ex.spec.resolution >= 1024), f"{model}: sliced decode exactly for 1024 px")
    return row


def _first_timestep(ex) -> float:
    import copy

    scheduler = copy.deepcopy(ex._pipe.scheduler)
    scheduler.set_timesteps(ex.spec.steps)
    return float(scheduler.timesteps[0])


def section_discriminator(torch, args) -> dict:
    import numpy as np
    from PIL import Image

    from backends.discriminator import build_discriminator
    from diffsim.profiling.profiler import time_calls

    disc = build_discriminator(device="cuda:0", dtype="fp32")
    rng = np.random.default_rng(0)
    results = {"arch": disc.arch, "image_size": disc.image_size, "batches": {}}
    for b in args.batch_sizes:
        images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(b)]
        samples = time_calls(lambda: disc.score(images), lambda: torch.cuda.synchronize(0), warmup=args.warmup,
                             iters=args.iters)
        scores = disc.score(images)
        ok = bool(np.all((scores >= 0) & (scores <= 1)))
        results["batches"][b] = {"p50_ms": round(float(np.median(samples)), 1), "scores_in_0_1": ok}
        say(f"[discriminator] {disc.arch} b={b} (512 px images -> {disc.image_size} px): "
            f"p50 {results['batches'][b]['p50_ms']} ms")
        check(ok, f"discriminator b={b}: scores in [0, 1]")
    return results


def section_oom(torch, args) -> dict:
    import numpy as np

    from backends import make_executor
    from diffsim.profiling.profiler import is_out_of_memory

    model = "sdxl-lightning"
    ex = make_executor("cuda", model, weights="random", device=0, discriminator=False)
    ex.load()
    text, seed = [PROMPT], [1]
    reference = np.asarray(ex.generate(text, seed)[0], dtype=np.int16)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(0)
    results: dict = {"model": model, "held_gib": round(held / GIB, 2)}

    def check_after(what: str) -> dict:
        vae_dtype = str(ex._pipe.vae.dtype).replace("torch.", "")
        image = np.asarray(ex.generate(text, seed)[0], dtype=np.int16)
        diff = float(np.abs(image - reference).mean())
        torch.cuda.empty_cache()
        back = torch.cuda.memory_allocated(0)
        say(f"[oom] after the {what}: VAE {vae_dtype}, mean pixel difference to before {diff:.2f}, "
            f"{back / GIB:.2f} GiB held (before {held / GIB:.2f})")
        ok = check(vae_dtype == "float16", f"VAE in fp16 after the {what}")
        ok = check(diff < 2.0, f"the same image after the {what}") and ok
        ok = check(back <= held + 256 * 2**20, f"memory given back after the {what}") and ok
        return {"vae_dtype": vae_dtype, "mean_pixel_diff": round(diff, 3), "held_gib": round(back / GIB, 2), "ok": ok}

    # A real OOM: this process may use only what the model holds plus 1 GiB, and a batch of 8 asks for more.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + GIB) / total), 0)
    try:
        texts, seeds = prompts(8)
        ex.generate(texts, seeds)
        results["real"] = {"raised": False}
        check(False, "a batch of 8 with 1 GiB to spare runs out of memory")
    except Exception as e:  # noqa: BLE001 - an allocation failure may come as another error type
        where = traceback.extract_tb(e.__traceback__)[-1]
        results["real"] = {"raised": type(e).__name__,
                           "where": f"{Path(where.filename).name}:{where.lineno} {where.name}"}
        say(f"[oom] {type(e).__name__} raised in {results['real']['where']}: {str(e).splitlines()[0][:160]}")
        check(is_out_of_memory(e), f"the capped batch failed with an out-of-memory error (got {type(e).__name__})")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    results["real"].update(check_after("real OOM"))

    # An OOM in the fp32 decode itself, where the pipeline has upcast its VAE.
    vae = ex._pipe.vae

    def decode_out_of_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated; VAE was {vae.dtype})")

    vae._decode = decode_out_of_memory
    try:
        ex.generate(text, seed)
        results["decode"] = {"raised": False}
        check(False, "the simulated decode OOM reached the caller")
    except torch.cuda.OutOfMemoryError as e:
        results["decode"] = {"raised": True, "message": str(e)}
        say(f"[oom] simulated out-of-memory in the decode: {e}")
        check("float32" in str(e), "the pipeline decodes in fp32 (force_upcast) when the OOM hits")
    finally:
        del vae._decode
    results["decode"].update(check_after("decode OOM"))
    ex.unload()
    return results


def section_workers(torch, args) -> dict:
    if torch.cuda.device_count() < 2:
        say("[workers] skipped: one GPU (two workers on two GPUs need two)")
        return {"skipped": "one GPU"}
    results = {"threads": _serve_two_workers(torch, ray=None)}
    try:
        import ray  # noqa: F401
    except ImportError:
        say("[workers] Ray is not installed: the --ray local run is skipped (pip install -e '.[ray]')")
        results["ray"] = {"skipped": "ray not installed"}
    else:
        from diffsim.server.ray_worker import disconnect

        try:
            results["ray"] = _serve_two_workers(torch, ray="local")
        finally:
            disconnect()  # stops the private cluster --ray local started
    return results


def _serve_two_workers(torch, *, ray: Optional[str]) -> dict:
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from backends.base import from_png
    from diffsim.server.http import HttpSettings
    from diffsim.server.startup import BackgroundServer, ServeOptions

    label = "ray actors" if ray else "threads"
    free_before = [torch.cuda.mem_get_info(d)[0] for d in (0, 1)]
    plan = {"threshold": 1.0, "light_workers": 1, "heavy_workers": 1, "light_batch": 4, "heavy_batch": 4}
    options = ServeOptions(backend="cuda", cascade="sdturbo-sdv15", gpus=2, policy="static", static_plan=plan,
                           gpu_profile="a100", batch_sizes=(1, 2, 4), slo_s=300.0, ray=ray)
    t0 = time.perf_counter()
    server = BackgroundServer(options, HttpSettings(max_n=4))
    server.start(timeout_s=900)
    started_s = time.perf_counter() - t0
    try:
        used_gib = [(free_before[d] - torch.cuda.mem_get_info(d)[0]) / GIB for d in (0, 1)]
        say(f"[workers] {label}: started in {started_s:.0f} s; GPU memory taken: cuda:0 {used_gib[0]:.1f} GiB, "
            f"cuda:1 {used_gib[1]:.1f} GiB")

        def ask(i: int) -> dict:
            t = time.perf_counter()
            reply = httpx.post(f"{server.url}/v1/images/generations", timeout=600,
                               json={"prompt": f"{PROMPT}, request {i}", "n": 1, "seed": i})
            body = reply.json()
            out = {"status": reply.status_code, "s": round(time.perf_counter() - t, 2)}
            if reply.status_code == 200:
                item = body["data"][0]
                out.update(model=item["model"], deferred=item["deferred"],
                           size=from_png(base64.b64decode(item["b64_json"])).size)
            return out

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        snapshot = httpx.get(f"{server.url}/v1/plan", timeout=30).json()
    finally:
        server.stop()
    busy = snapshot["workers"]["busy_s"]
    say(f"[workers] {label}: {sum(a['status'] == 200 for a in answers)}/8 answered 200 "
        f"(models {sorted({a.get('model') for a in answers} - {None})}), busy s per worker {busy}, "
        f"slowest answer {max(a['s'] for a in answers)} s")
    ok = check(all(a["status"] == 200 for a in answers), f"{label}: every request answered 200")
    ok = check(all(b > 0 for b in busy), f"{label}: both workers ran batches") and ok
    ok = check(min(used_gib) > 0.5, f"{label}: both GPUs hold models") and ok
    return {"started_s": round(started_s, 1), "gpu_gib": [round(g, 2) for g in used_gib], "busy_s": busy,
            "answers": answers, "ok": ok}


def section_compile(torch, args) -> dict:
    import numpy as np

    from backends import make_executor
    from diffsim.profiling.profiler import time_calls

    results = {}
    for model in ("sd-turbo", "sdxl-lightning"):
        row = {}
        for compiled in (False, True):
            ex = make_executor("cuda", model, weights="random", device=0, discriminator=False,
                               compile_unet=compiled)
            ex.load()
            texts, seeds = prompts(4)
            t0 = time.perf_counter()
            ex.generate(texts[:1], seeds[:1])
            ex.generate(texts, seeds)  # the first calls compile (batch 1 is specialised, 4 is dynamic)
            first_s = time.perf_counter() - t0
            samples = time_calls(lambda: ex.generate(texts, seeds), ex.synchronize, warmup=1, iters=args.iters)
            key = "compiled" if compiled else "eager"
            row[key] = {"first_calls_s": round(first_s, 1), "p50_ms_b4": round(float(np.median(samples)), 1)}
            if compiled:
                row[key]["watch"] = ex._compile_watch.describe()
                check(ex._compile_watch.eager_runs == 0, f"{model}: every UNet call compiled")
            ex.unload()
            torch.cuda.empty_cache()
        say(f"[compile] {model} b=4: eager {row['eager']['p50_ms_b4']} ms, compiled {row['compiled']['p50_ms_b4']} "
            f"ms (first calls {row['compiled']['first_calls_s']} s); {row['compiled']['watch']}")
        results[model] = row
    return results


RUNNERS: dict[str, Callable] = {
    "models": section_models,
    "discriminator": section_discriminator,
    "oom": section_oom,
    "workers": section_workers,
    "compile": section_compile,
}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        torch = require_cuda()
    except Refused as e:
        print(f"gpu_smoke: {e}", file=sys.stderr)
        return REFUSED
    report: dict = {"environment": environment(torch), "sections": {}, "errors": {}}
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            report["sections"][name] = RUNNERS[name](torch, args)
        except Exception as e:  # noqa: BLE001 - one failing section must not hide the others' figures
            report["errors"][name] = f"{type(e).__name__}: {e}"
            say(f"[{name}] FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        say(f"[{name}] {time.perf_counter() - t0:.0f} s")
    failed = sorted(report["errors"])
    report["failed_checks"] = list(failed_checks)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"wrote {args.out}")
    say("gpu_smoke: " + (f"sections that raised: {', '.join(failed)}; " if failed else "every section ran; ")
        + (f"{len(failed_checks)} check(s) failed: {'; '.join(failed_checks)}" if failed_checks
           else "every check passed"))
    return 1 if failed or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
