"""Compose whole-pipeline H100 latency profiles from per-component measurements.

The H100 reference (``profiles/sources/h100-components.csv``) times each piece of each model on its
own: text encoder(s), one UNet step, VAE decode, safety checker, discriminator, per batch size. A
pipeline's batch latency is the sum of its pieces, each at the batch size it runs at (the UNet at 2b
under classifier-free guidance), times how often it runs. Two modes:

* ``eager``: the eager median of every piece (what plain diffusers pays on the measuring host; at
  small batch that host, not the GPU, sets the figure);
* ``graph``: the CUDA-graph median where measured, else the eager median (the reference skipped
  graphs only where eager is GPU-bound), plus the scheduler/CFG glue of the denoising loop
  (:func:`glue_ms`). This is a floor for the GPU, not a forecast for an eager server.

``python -m diffsim.profiling.compose`` writes ``h100-eager.yaml`` and ``h100-graph.yaml`` in the format of
:class:`diffsim.profiles.GpuProfile`, and prints how the same rules reproduce the end-to-end runs in
``h100-e2e.csv``. Only the standard library is used: this runs where torch is absent.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DiffsimError, InputError

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
MODES = ("eager", "graph")

# Profile model name -> model name in the H100 CSVs.
H100_MODEL = {
    "sd-turbo": "sdturbo",
    "sdxs": "sdxs",
    "sd-v1.5": "sdv15",
    "sdxl-lightning": "sdxl",  # same UNet, text encoders and VAE as SDXL
    "sdxl": "sdxl",
}
# Model name in h100-e2e.csv -> profile model name.
E2E_MODEL = {
    "sdturbo": "sd-turbo",
    "sdxs": "sdxs",
    "sdv15": "sd-v1.5",
    "sdxl-lightning": "sdxl-lightning",
    "sdxl": "sdxl",
}

# UNet calls per request as the DiffServe artifact runs each model (shared/reference/h100/README.md):
# SD v1.5 runs PNDM with 50 steps, which makes 51 UNet calls (diffusers' PNDM repeats one timestep to
# start its PLMS multistep).
DEFAULT_UNET_CALLS = {"sd-turbo": 1, "sdxs": 1, "sd-v1.5": 51, "sdxl-lightning": 2, "sdxl": 50}
CFG_MODELS = frozenset({"sd-v1.5", "sdxl"})  # guidance > 1: the UNet runs at batch 2b

# The discriminator DiffServe's artifact runs: torchvision efficientnet_v2_s, fp32, 224x224.
DEFAULT_DISCRIMINATOR = "effnetv2s_tv_fp32"

# Models whose scheduler syncs host and GPU every step (PNDM and DDIM index a CPU table with a CUDA
# timestep), so the eager glue between UNet calls cannot overlap the GPU. Euler loops (SDXL, Lightning)
# do not sync: the host enqueues the glue while the GPU runs the UNet, so only the fixed part shows.
STEP_SYNC_MODELS = frozenset({"sd-v1.5"})

# Eager scheduler/CFG glue of the denoising loop, added in graph mode only (in eager mode it hides
# under host launch time). Chosen from the graphed e2e runs (see profiles/README.md): 1-call loops
# leave 0.66-0.92 ms beyond the component sum, 50-call DDIM CFG loops 47-62 ms, i.e. 0.95-1.26 ms per
# further call. Rounded down so the graph profile stays a floor.
GLUE_FIRST_CALL_MS = 0.7  # set_timesteps, initial noise, and the first call's scheduler step
GLUE_PER_FURTHER_CALL_MS = 1.0  # each further UNet call of a step-syncing loop: CFG cat/combine, scheduler.step

# Where the reference does not say: its run date is taken as the month it was delivered.
REFERENCE_DATE = "2026-11"
# Software on the measuring machine, transcribed from shared/reference/h100/env.json.
REFERENCE_SOFTWARE = {
    "python": "3.12.3",
    "torch": "2.11.0+cu130",
    "cuda_runtime": "13.0",
    "cudnn": "91900",
    "diffusers": "0.42.1",
    "transformers": "5.17.0",
    "timm": "1.0.29",
    "torchvision": "0.26.0+cu130",
    "torch_settings": "cudnn.benchmark off, TF32 matmul off, TF32 cuDNN conv on, SDPA attention, no torch.compile",
}
REGENERATE_COMMAND = (
    "python -m diffsim.profiling.compose --components profiles/sources/h100-components.csv "
    "--e2e profiles/sources/h100-e2e.csv --out-dir profiles"
)

COMPONENT_COLUMNS = (
    "gpu", "model", "component", "batch", "latency_ms_median", "graph_ms_median",
    "component_weights_gib", "activation_gib",
)  # fmt: skip
E2E_COLUMNS = (
    "setting", "mode", "model", "batch", "steps", "unet_batch", "e2e_ms_median", "predicted_ms", "peak_mem_gib",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True)
class Measurement:
    """One row of the component CSV: one piece of one model at one batch size."""

    model: str
    component: str
    batch: int
    eager_ms: float
    graph_ms: Optional[float]  # None where no CUDA graph was timed
    weights_gib: float
    activation_gib: float


@dataclass(frozen=True)
class Components:
    """All component measurements of one GPU, looked up by (model, component, batch)."""

    path: str
    gpu: str
    rows: dict[tuple[str, str, int], Measurement]

    def get(self, model: str, component: str, batch: int) -> Optional[Measurement]:
        return self.rows.get((model, component, batch))

    def components_of(self, model: str) -> list[str]:
        return sorted({c for (m, c, _) in self.rows if m == model})


@dataclass(frozen=True)
class E2eRun:
    """One end-to-end run of h100-e2e.csv."""

    line: int
    setting: str
    mode: str  # "eager" | "graphed"
    model: str  # profile model name
    batch: int
    unet_calls: int
    unet_batch: int
    measured_ms: float
    reference_predicted_ms: float
    peak_mem_gib: float


def _open_csv(path: Path, required: tuple[str, ...]) -> tuple[csv.DictReader, object]:
    try:
        handle = open(path, newline="")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    reader = csv.DictReader(handle)
    header = reader.fieldnames
    if not header:
        handle.close()
        raise InputError(f"{path}: line 1: no header line")
    missing = [c for c in required if c not in header]
    if missing:
        handle.close()
        raise InputError(f"{path}: line 1: missing column {missing[0]!r}")
    return reader, handle


def _check_width(path: Path, reader: csv.DictReader, row: dict) -> None:
    if None in row or any(v is None for v in row.values()):
        got = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
        raise InputError(f"{path}: line {reader.line_num}: expected {len(reader.fieldnames)} fields, got {got}")


def _number(
    path: Path, line: int, row: dict, column: str, *, optional: bool = False, minimum: float = 0.0, strict: bool = False
) -> Optional[float]:
    text = row[column].strip()
    if text == "" and optional:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{path}: line {line}: column {column!r}: expected a number, got {text!r}") from None
    if not value == value or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise InputError(f"{path}: line {line}: column {column!r}: expected a number {bound}, got {text!r}")
    return value


def _batch(path: Path, line: int, row: dict, column: str) -> int:
    text = row[column].strip()
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"{path}: line {line}: column {column!r}: expected a batch size >= 1, got {text!r}")
    return int(text)


def read_components(path: Path | str) -> Components:
    """Read the component CSV; a bad cell raises InputError naming the file, the line and the column."""
    path = Path(path)
    reader, handle = _open_csv(path, COMPONENT_COLUMNS)
    rows: dict[tuple[str, str, int], Measurement] = {}
    gpus: set[str] = set()
    with handle:
        for row in reader:
            _check_width(path, reader, row)
            line = reader.line_num
            for column in ("gpu", "model", "component"):
                if not row[column].strip():
                    raise InputError(f"{path}: line {line}: column {column!r}: empty")
            gpu = row["gpu"].strip()
            if gpus and gpu not in gpus:
                raise InputError(f"{path}: line {line}: column 'gpu': {gpu!r} differs from {sorted(gpus)[0]!r}")
            gpus.add(gpu)
            m = Measurement(
                model=row["model"].strip(),
                component=row["component"].strip(),
                batch=_batch(path, line, row, "batch"),
                eager_ms=_number(path, line, row, "latency_ms_median", strict=True),
                graph_ms=_number(path, line, row, "graph_ms_median", optional=True, strict=True),
                weights_gib=_number(path, line, row, "component_weights_gib"),
                activation_gib=_number(path, line, row, "activation_gib"),
            )
            key = (m.model, m.component, m.batch)
            if key in rows:
                raise InputError(f"{path}: line {line}: duplicate row for {m.model}/{m.component} batch {m.batch}")
            rows[key] = m
    if not rows:
        raise InputError(f"{path}: line 2: no measurement rows")
    return Components(path=str(path), gpu=gpus.pop(), rows=rows)


_STEPS = re.compile(r"^(\d+)(?:\s*\((\d+) unet calls\))?$")


def read_e2e(path: Path | str) -> list[E2eRun]:
    """Read the end-to-end CSV; a bad cell raises InputError naming the file, the line and the column."""
    path = Path(path)
    reader, handle = _open_csv(path, E2E_COLUMNS)
    runs = []
    with handle:
        for row in reader:
            _check_width(path, reader, row)
            line = reader.line_num
            mode = row["mode"].strip()
            if mode not in ("eager", "graphed"):
                raise InputError(f"{path}: line {line}: column 'mode': expected eager or graphed, got {mode!r}")
            model = row["model"].strip()
            if model not in E2E_MODEL:
                known = ", ".join(sorted(E2E_MODEL))
                raise InputError(f"{path}: line {line}: column 'model': unknown model {model!r} (known: {known})")
            steps = _STEPS.match(row["steps"].strip())
            if not steps or int(steps.group(1)) < 1:
                raise InputError(
                    f"{path}: line {line}: column 'steps': expected 'N' or 'N (M unet calls)', got {row['steps']!r}"
                )
            runs.append(
                E2eRun(
                    line=line,
                    setting=row["setting"].strip(),
                    mode=mode,
                    model=E2E_MODEL[model],
                    batch=_batch(path, line, row, "batch"),
                    unet_calls=int(steps.group(2) or steps.group(1)),
                    unet_batch=_batch(path, line, row, "unet_batch"),
                    measured_ms=_number(path, line, row, "e2e_ms_median", strict=True),
                    reference_predicted_ms=_number(path, line, row, "predicted_ms", strict=True),
                    peak_mem_gib=_number(path, line, row, "peak_mem_gib"),
                )
            )
    if not runs:
        raise InputError(f"{path}: line 2: no end-to-end rows")
    return runs


# ----------------------------------------------------------------------------------------------
# Composition rules


@dataclass(frozen=True)
class Term:
    """``count`` runs of one component at one batch size. ``graphed``: replayed from a CUDA graph in
    graph mode (False: it stays eager there too, e.g. CPU work or the safety checker's host syncs)."""

    count: int
    model: str  # model name in the component CSV
    component: str
    batch: int
    graphed: bool = True


@dataclass(frozen=True)
class Recipe:
    """The pieces of one batch, and the denoising loop whose scheduler glue they carry in graph mode."""

    terms: tuple[Term, ...]
    unet_calls: int = 0  # 0: no denoising loop (the discriminator), so no glue
    step_sync: bool = False  # the scheduler syncs host and GPU every step (see STEP_SYNC_MODELS)


def pipeline_recipe(
    model: str,
    batch: int,
    *,
    unet_calls: Optional[int] = None,
    safety_checker: bool = True,
    graphed: Optional[frozenset[str]] = None,
) -> Recipe:
    """The components of one whole-pipeline batch of ``model`` (a profile model name).

    ``unet_calls`` overrides the model's default number of UNet calls; ``safety_checker`` applies to
    SD v1.5 only; ``graphed`` names the components replayed from CUDA graphs in graph mode (default all).
    """
    if model not in H100_MODEL:
        raise DiffsimError(f"unknown model {model!r} (known: {', '.join(H100_MODEL)})")
    src = H100_MODEL[model]
    calls = DEFAULT_UNET_CALLS[model] if unet_calls is None else unet_calls
    unet_batch = 2 * batch if model in CFG_MODELS else batch

    def term(count: int, component: str, b: int) -> Term:
        return Term(count, src, component, b, graphed is None or component in graphed)

    if model in ("sd-turbo", "sdxs"):
        vae = "vae_decode" if model == "sd-turbo" else "vae_decode_tiny"
        terms = [term(1, "text_encoder", batch), term(calls, "unet_step", batch), term(1, vae, batch)]
    elif model == "sd-v1.5":
        # prompt and empty negative prompt each go through the text encoder at batch b
        terms = [term(2, "text_encoder", batch), term(calls, "unet_step", unet_batch), term(1, "vae_decode", batch)]
        if safety_checker:
            terms.append(Term(1, src, "safety_checker", batch, graphed=False))
    else:  # sdxl-lightning, sdxl: zero negative embeddings, so each text encoder runs once; fp32 VAE
        terms = [
            term(1, "text_encoders_total", batch),
            term(calls, "unet_step", unet_batch),
            term(1, "vae_decode_fp32", batch),
        ]
    return Recipe(tuple(terms), unet_calls=calls, step_sync=model in STEP_SYNC_MODELS)


def discriminator_recipe(batch: int, component: str = DEFAULT_DISCRIMINATOR) -> Recipe:
    return Recipe((Term(1, "discriminator", component, batch),), unet_calls=0)


def glue_ms(unet_calls: int, step_sync: bool) -> float:
    """Exposed eager scheduler/CFG glue of a denoising loop with ``unet_calls`` UNet calls (graph mode
    only): the fixed part always, the per-call part only where the scheduler syncs every step."""
    if unet_calls <= 0:
        return 0.0
    return GLUE_FIRST_CALL_MS + (GLUE_PER_FURTHER_CALL_MS * (unet_calls - 1) if step_sync else 0.0)


def term_ms(m: Measurement, mode: str, graphed: bool = True) -> float:
    """One run of a component: eager median, or in graph mode its graph median where there is one."""
    if mode == "graph" and graphed and m.graph_ms is not None:
        return m.graph_ms
    return m.eager_ms


@dataclass(frozen=True)
class Composition:
    """A composed batch latency with its parts; ``total_ms`` is None when a component is missing."""

    total_ms: Optional[float]
    parts: tuple[tuple[Term, float], ...]  # (term, ms of ONE run of it)
    glue_ms: float
    missing: Optional[Term] = None


def compose(recipe: Recipe, components: Components, mode: str) -> Composition:
    if mode not in MODES:
        raise DiffsimError(f"unknown composition mode {mode!r} (known: {', '.join(MODES)})")
    parts = []
    for t in recipe.terms:
        m = components.get(t.model, t.component, t.batch)
        if m is None:
            return Composition(None, tuple(parts), 0.0, missing=t)
        parts.append((t, term_ms(m, mode, t.graphed)))
    glue = glue_ms(recipe.unet_calls, recipe.step_sync) if mode == "graph" else 0.0
    total = sum(t.count * ms for t, ms in parts) + glue
    return Composition(total, tuple(parts), glue)


def peak_mem_gib(recipe: Recipe, components: Components) -> Optional[float]:
    """Estimated peak GPU memory of one batch: the weights of every component held resident together,
    plus the largest activation of any one component (components run one after another, so their
    activations do not overlap). Allocated bytes, as the reference measures; CUDA-graph pools and the
    caching allocator's slack are not counted. None when a component is missing."""
    weights: dict[tuple[str, str], float] = {}
    largest_activation = 0.0
    for t in recipe.terms:
        m = components.get(t.model, t.component, t.batch)
        if m is None:
            return None
        weights[(t.model, t.component)] = m.weights_gib
        largest_activation = max(largest_activation, m.activation_gib)
    return sum(weights.values()) + largest_activation


# ----------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class Table:
    """One model's (or the discriminator's) composed latency and memory per batch size, unrounded."""

    batch_sizes: tuple[int, ...]
    p50_ms: tuple[Optional[float], ...]
    peak_mem_gib: tuple[Optional[float], ...]


def _table(batch_sizes: tuple[int, ...], recipes: list[Recipe], components: Components, mode: str, what: str) -> Table:
    p50 = tuple(compose(r, components, mode).total_ms for r in recipes)
    mem = tuple(peak_mem_gib(r, components) if v is not None else None for r, v in zip(recipes, p50))
    if all(v is None for v in p50):
        missing = compose(recipes[0], components, mode).missing
        raise InputError(
            f"{components.path}: no batch size has every component of {what} "
            f"(no row for {missing.model}/{missing.component} batch {missing.batch})"
        )
    return Table(tuple(batch_sizes), p50, mem)


def profile_tables(
    components: Components,
    mode: str,
    *,
    discriminator: str = DEFAULT_DISCRIMINATOR,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> tuple[dict[str, Table], Table]:
    """Every profile model's table and the discriminator's, for one mode."""
    models = {
        name: _table(batch_sizes, [pipeline_recipe(name, b) for b in batch_sizes], components, mode, name)
        for name in H100_MODEL
    }
    disc_recipes = [discriminator_recipe(b, discriminator) for b in batch_sizes]
    disc = _table(batch_sizes, disc_recipes, components, mode, discriminator)
    return models, disc


def _ms(v: Optional[float]) -> str:
    return "null" if v is None else repr(round(v, 1))


def _gib(v: Optional[float]) -> str:
    return "null" if v is None else repr(round(v, 2))


def _flow(values, fmt) -> str:
    return "[" + ", ".join(fmt(v) for v in values) + "]"


def _yaml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_METHOD = {
    "eager": (
        "sum of per-component eager medians (CUDA events, device synchronised per call), each component at the "
        "batch it runs at in the pipeline; no scheduler glue (hidden under host launch time)"
    ),
    "graph": (
        "sum of per-component CUDA-graph replay medians (eager median where no graph was timed: GPU-bound cases, "
        f"and the safety checker), plus eager scheduler/CFG glue of {GLUE_FIRST_CALL_MS} ms for the first UNet call "
        f"and {GLUE_PER_FURTHER_CALL_MS} ms per further call where the scheduler syncs every step (PNDM: sd-v1.5)"
    ),
}
_HEADLINE = {
    "eager": "plain eager diffusers. Small batches are HOST-BOUND on the measuring VM (launch overhead), so "
    "these figures are that host's, an upper bound for a bare-metal server.",
    "graph": "the CUDA-graph FLOOR: GPU execution time with no host launch overhead. A lower bound for eager "
    "diffusers on any host.",
}


def validation_summary(rows: list[dict], mode: str) -> str:
    """One line for the profile's notes: how far the composition is from the matching e2e runs."""
    e2e_mode = "graphed" if mode == "graph" else "eager"
    errs = [r["error_pct"] for r in rows if r["mode"] == e2e_mode]
    if not errs:
        return f"no {e2e_mode} e2e runs to compare with"
    spread = f"{min(errs):+.1f}% .. {max(errs):+.1f}%"
    return f"{len(errs)} {e2e_mode} e2e runs, error (measured - composed)/measured {spread}"


def render_profile_yaml(
    components: Components,
    runs: list[E2eRun],
    mode: str,
    *,
    discriminator: str = DEFAULT_DISCRIMINATOR,
    command: str = REGENERATE_COMMAND,
) -> str:
    """The text of ``h100-<mode>.yaml``: deterministic, so regenerating it is diffable."""
    models, disc = profile_tables(components, mode, discriminator=discriminator)
    sd15 = DEFAULT_UNET_CALLS["sd-v1.5"]
    notes = (
        f"sd-v1.5: PNDM 50 steps = {sd15} UNet calls at batch 2b (CFG), 2 text-encoder runs, safety checker included "
        "(its GPU forward; CPU feature extraction excluded). sdxl: Euler 50, CFG; both SDXL pipelines decode in fp32. "
        f"Discriminator: {discriminator} (the DiffServe artifact's). Excluded everywhere: tokenizers, CPU "
        "postprocessing to PIL, discriminator preprocessing, queueing. "
        "peak_mem_gib: weights of all components resident + largest single-component activation (allocated bytes). "
        f"Check against h100-e2e.csv: {validation_summary(validation_rows(components, runs), mode)}."
    )
    lines = [
        f"# GENERATED by `{command}`: do not edit; change diffsim/profiling/compose.py or the sources and regenerate.",
        f"# H100 whole-pipeline batch latency ({mode}), composed from per-component measurements.",
        f"# This is {_HEADLINE[mode]}",
        "# null = a component was not measured at that batch (does not fit / not attempted).",
        "# Between measured batch sizes: linear interpolation, never extrapolated (see diffsim/profiles.py).",
        "# Rules, validation against end-to-end runs and caveats: profiles/README.md.",
        f"gpu: h100-{mode}",
        "provenance:",
        "  source: " + _yaml_str(
            "H100 component measurements with random weights (shared/reference/h100: components.csv, e2e.csv), "
            "copied to profiles/sources/h100-components.csv and h100-e2e.csv; composed by diffsim.profiling.compose"
        ),
        f"  gpu: {_yaml_str(components.gpu)}",
        f"  date: {_yaml_str(REFERENCE_DATE)}",
        "  software: {" + ", ".join(f"{k}: {_yaml_str(v)}" for k, v in REFERENCE_SOFTWARE.items()) + "}",
        f"  method: {_yaml_str(_METHOD[mode])}",
        f"  notes: {_yaml_str(notes)}",
        "models:",
    ]
    for name, table in models.items():
        lines += [
            f"  {name}:",
            f"    batch_sizes: {_flow(table.batch_sizes, str)}",
            f"    p50_ms: {_flow(table.p50_ms, _ms)}",
            f"    peak_mem_gib: {_flow(table.peak_mem_gib, _gib)}",
        ]
    lines += [
        "discriminator:",
        f"  batch_sizes: {_flow(disc.batch_sizes, str)}",
        f"  p50_ms: {_flow(disc.p50_ms, _ms)}",
        f"  peak_mem_gib: {_flow(disc.peak_mem_gib, _gib)}",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Validation against the end-to-end runs

# Extra pieces of the e2e settings whose name contains the key (shared/reference/h100/README.md, E2E).
E2E_EXTRAS = {
    "full_pipeline": lambda b: (
        Term(2, "sdv15", "postprocess_pil_cpu", b, graphed=False),
        Term(1, "sdv15", "safety_feature_extractor_cpu", b, graphed=False),
        Term(1, "sdv15", "safety_checker", b, graphed=False),
    ),
    "cascade_light_path": lambda b: (
        Term(1, "sdturbo", "postprocess_pil_cpu", b, graphed=False),
        Term(1, "discriminator", "preproc_pil_to_224_cpu", b, graphed=False),
        Term(1, "discriminator", DEFAULT_DISCRIMINATOR, b),
    ),
}
# Components replayed from CUDA graphs in the reference's graphed runs, where not all of them were.
E2E_GRAPHED_ONLY = {"sdxl-lightning": frozenset({"unet_step"})}


def e2e_recipe(run: E2eRun, path: str = "<e2e>") -> Recipe:
    """The same composition rules, at the run's own scheduler setting (its number of UNet calls)."""
    graphed = E2E_GRAPHED_ONLY.get(run.model) if run.mode == "graphed" else None
    recipe = pipeline_recipe(run.model, run.batch, unet_calls=run.unet_calls, safety_checker=False, graphed=graphed)
    unet = next(t for t in recipe.terms if t.component == "unet_step")
    if unet.batch != run.unet_batch:
        raise InputError(
            f"{path}: line {run.line}: column 'unet_batch': {run.unet_batch}, but {run.model} at batch "
            f"{run.batch} runs its UNet at batch {unet.batch}"
        )
    extras = tuple(t for key, make in E2E_EXTRAS.items() if key in run.setting for t in make(run.batch))
    return Recipe(recipe.terms + extras, recipe.unet_calls, recipe.step_sync)


def validation_rows(components: Components, runs: list[E2eRun], path: str = "<e2e>") -> list[dict]:
    """Composed against measured for every e2e run (eager runs vs eager rules, graphed vs graph rules)."""
    rows = []
    for run in runs:
        recipe = e2e_recipe(run, path)
        mode = "graph" if run.mode == "graphed" else "eager"
        c = compose(recipe, components, mode)
        if c.total_ms is None:
            t = c.missing
            raise InputError(
                f"{components.path}: no row for {t.model}/{t.component} batch {t.batch}, "
                f"needed by e2e run {run.setting} ({path} line {run.line})"
            )
        rows.append(
            {
                "setting": run.setting,
                "mode": run.mode,
                "batch": run.batch,
                "unet": f"{run.unet_batch} x {run.unet_calls}",
                "measured_ms": run.measured_ms,
                "composed_ms": c.total_ms,
                "glue_ms": c.glue_ms,
                "residual_ms": run.measured_ms - (c.total_ms - c.glue_ms),
                "error_pct": 100.0 * (run.measured_ms - c.total_ms) / run.measured_ms,
                "reference_error_pct": 100.0 * (run.measured_ms - run.reference_predicted_ms) / run.measured_ms,
                "peak_mem_est_gib": peak_mem_gib(recipe, components),
                "peak_mem_measured_gib": run.peak_mem_gib,
            }
        )
    return rows


def format_validation_table(rows: list[dict]) -> str:
    """Markdown table of :func:`validation_rows` (also pasted into profiles/README.md)."""
    head = (
        "| setting | mode | b | UNet batch x calls | measured ms | composed ms | error % | reference error % "
        "| residual ms (measured - components) | peak mem est / process peak GiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    body = [
        f"| {r['setting']} | {r['mode']} | {r['batch']} | {r['unet']} | {r['measured_ms']:.1f} | "
        f"{r['composed_ms']:.1f} | {r['error_pct']:+.1f} | {r['reference_error_pct']:+.1f} | "
        + (f"{r['residual_ms']:.2f}" if r["mode"] == "graphed" else "")
        + f" | {r['peak_mem_est_gib']:.1f} / {r['peak_mem_measured_gib']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def _short_ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def format_profile_table(components: Components, *, discriminator: str = DEFAULT_DISCRIMINATOR) -> str:
    """Markdown table of both profiles, eager / graph ms per batch size (for profiles/README.md)."""
    eager, eager_disc = profile_tables(components, "eager", discriminator=discriminator)
    graph, graph_disc = profile_tables(components, "graph", discriminator=discriminator)
    eager["discriminator"], graph["discriminator"] = eager_disc, graph_disc
    head = "| model | " + " | ".join(f"b={b}" for b in BATCH_SIZES) + " |\n|---|" + "---|" * len(BATCH_SIZES)
    body = []
    for name in eager:
        cells = [
            "–" if e is None else f"{_short_ms(e)} / {_short_ms(g)}"
            for e, g in zip(eager[name].p50_ms, graph[name].p50_ms)
        ]
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, *body])


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffsim.profiling.compose",
        description="Compose the H100 eager and CUDA-graph latency profiles from component measurements, "
        "and check the composition against the end-to-end runs.",
    )
    parser.add_argument("--components", required=True, type=Path, help="component CSV (h100-components.csv)")
    parser.add_argument("--e2e", required=True, type=Path, help="end-to-end CSV (h100-e2e.csv)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for h100-eager.yaml, h100-graph.yaml")
    parser.add_argument(
        "--discriminator",
        default=DEFAULT_DISCRIMINATOR,
        help=f"discriminator component in the CSV (default {DEFAULT_DISCRIMINATOR}, DiffServe's; "
        "also measured: effnetv2s_tv_fp16, effnetb0_timm_fp32, effnetb0_timm_fp16)",
    )
    args = parser.parse_args(argv)
    command = (
        f"python -m diffsim.profiling.compose --components {args.components} --e2e {args.e2e} --out-dir {args.out_dir}"
        + ("" if args.discriminator == DEFAULT_DISCRIMINATOR else f" --discriminator {args.discriminator}")
    )
    try:
        components = read_components(args.components)
        runs = read_e2e(args.e2e)
        rows = validation_rows(components, runs, str(args.e2e))
        texts = {
            mode: render_profile_yaml(components, runs, mode, discriminator=args.discriminator, command=command)
            for mode in MODES
        }
        if not args.out_dir.is_dir():
            raise DiffsimError(f"{args.out_dir}: no such folder")
        for mode, text in texts.items():
            out = args.out_dir / f"h100-{mode}.yaml"
            out.write_text(text)
            print(f"wrote {out}")
    except DiffsimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_profile_table(components, discriminator=args.discriminator))
    print()
    print(format_validation_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
