"""Calibration: measure a cascade's quality profile (deferral curve and FID of the served mix) from images.

For every calibration prompt the light and the heavy model each generate one image (seeded per prompt); the
discriminator scores the light image (confidence = P(real)); Inception features of every image are kept. From
those, without generating anything again:

* the **deferral curve** ``f(t)``: the fraction of prompts whose confidence is below ``t``, on a threshold grid;
* the **FID of the served mix** against the light-served fraction ``r``: the ``round(r n)`` prompts with the
  highest confidence (the easiest) keep their light image, the others get their heavy image, and the FID of
  those ``n`` images against the real images' features is recorded (what a threshold serves: a prompt stays
  light exactly when its confidence is at least the threshold);
* the **FID of a random mix** on the same grid: the same, but the prompts that stay light are the first
  ``round(r n)`` of one seeded random permutation (query-agnostic routing, what Proteus serves).

The result is a cascades file (:class:`diffsim.profiles.CascadesFile`, one cascade) plus the per-prompt
confidences as CSV ``prompt_id,confidence`` beside it, referenced by the cascade's ``confidences`` field.

This module holds no torch: generation goes through an executor (:mod:`backends`) and feature extraction
through an extractor object, both passed in, so the bookkeeping is testable with stand-ins.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import yaml

from ..errors import DiffsimError, InputError
from ..quality.frechet import FeatureStats, fid_against
from ..textfile import read_text

PROMPTS_CSV_HEADER = ("prompt_id", "prompt")
CONFIDENCE_FORMAT = "{:.8f}"
DEFAULT_THRESHOLDS = tuple(round(i * 0.005, 3) for i in range(201))
DEFAULT_R_GRID = tuple(round(i * 0.1, 1) for i in range(11))
SOURCE = "diffsim calibrate"


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str


def read_prompts(path: Path | str, *, limit: Optional[int] = None) -> list[Prompt]:
    """Read calibration prompts, in file order.

    Two formats: a CSV whose first line is the header ``prompt_id,prompt`` (ids: distinct integers >= 0; quote
    prompts that hold commas), or plain text with one prompt per line, whose prompt ids are the 0-based line
    positions (so the ids of a caption list match traces that index it). A blank line before the last prompt
    is an error (it would shift every later id). ``limit`` keeps the first ``limit`` prompts.
    """
    path = Path(path)
    text = read_text(path, "prompts file")  # one line naming the file (and where it stops being UTF-8)
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""  # read_text has dropped a byte-order mark
    if [c.strip() for c in first.split(",")] == list(PROMPTS_CSV_HEADER):
        prompts = _read_prompts_csv(path, text)
    else:
        prompts = _read_prompts_lines(path, lines)
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    if limit is not None:
        if limit < 1:
            raise DiffsimError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


def _read_prompts_lines(path: Path, lines: list[str]) -> list[Prompt]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    prompts = []
    for i, line in enumerate(lines):
        if not line.strip():
            raise InputError(f"{path}: line {i + 1}: empty prompt (prompt ids are line positions: "
                             f"remove the blank line)")
        prompts.append(Prompt(i, line.strip()))
    return prompts


def _read_prompts_csv(path: Path, text: str) -> list[Prompt]:
    reader = csv.reader(text.splitlines())
    next(reader)  # header, checked by the caller
    prompts: list[Prompt] = []
    seen: set[int] = set()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise InputError(f"{path}: line {reader.line_num}: bad CSV ({e})") from None
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise InputError(f"{path}: line {line}: expected 2 fields prompt_id,prompt, got {len(row)} "
                             f"(quote a prompt that holds commas)")
        raw_id, prompt = row[0].strip(), row[1].strip()
        try:
            pid = int(raw_id)
        except ValueError:
            raise InputError(f"{path}: line {line}: prompt_id {raw_id!r} is not an integer") from None
        if pid < 0:
            raise InputError(f"{path}: line {line}: prompt_id {pid} is negative")
        if pid in seen:
            raise InputError(f"{path}: line {line}: prompt_id {pid} appears twice")
        if not prompt:
            raise InputError(f"{path}: line {line}: empty prompt")
        seen.add(pid)
        prompts.append(Prompt(pid, prompt))
    return prompts


MAX_GRID_POINTS = 100_000


def parse_grid(text: str, flag: str) -> tuple[float, ...]:
    """A grid on [0, 1]: ``0,0.1,...,1`` (explicit values) or ``START:STOP:STEP`` (a range, ends included).

    It must start at 0, end at 1 and increase strictly, as the profile's curves require.
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not all(math.isfinite(x) for x in parts):
                raise ValueError
            if not step > 0:
                raise DiffsimError(f"{flag}: the step must be > 0, got {step:g}")
            if (stop - start) / step > MAX_GRID_POINTS:
                raise DiffsimError(f"{flag}: a step of {step:g} makes more than {MAX_GRID_POINTS:,} grid points")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            decimals = max(0, -math.floor(math.log10(step))) + 3
            values = [round(start + i * step, decimals) for i in range(count)]
            if values and abs(values[-1] - stop) > 1e-9:
                values.append(stop)
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DiffsimError(f"{flag}: expected comma-separated numbers or START:STOP:STEP, got {text!r}") from None
    if len(values) < 2:
        raise DiffsimError(f"{flag}: give at least two values (0 and 1)")
    if values[0] != 0 or values[-1] != 1:
        raise DiffsimError(f"{flag}: the grid must start at 0 and end at 1, got {values[0]:g} .. {values[-1]:g}")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise DiffsimError(f"{flag}: values must increase strictly")
    return tuple(values)


def prompt_seed(prompt_id: int, seed: int) -> int:
    """The generation seed of one prompt: a hash of (seed, prompt id), the same for the light and heavy model."""
    if seed < 0:
        raise DiffsimError(f"--seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, prompt_id]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Curves (pure)


def deferral_curve(confidences: np.ndarray, thresholds: Sequence[float]) -> list[float]:
    """f(t) for each t: the fraction of confidences strictly below t (those prompts are deferred)."""
    conf = np.sort(np.asarray(confidences, dtype=np.float64))
    if conf.size == 0:
        raise DiffsimError("no confidences to build a deferral curve from")
    below = np.searchsorted(conf, np.asarray(thresholds, dtype=np.float64), side="left")
    return [float(b) / conf.size for b in below]


def light_count(r: float, n: int) -> int:
    """Prompts served light when a fraction r of n is: round(r n), halves rounded up."""
    return int(math.floor(r * n + 0.5))


def easiest_first(confidences: np.ndarray) -> np.ndarray:
    """Prompt indices from the highest confidence down (ties: file order): the order prompts stay light."""
    return np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")


def random_order(n: int, seed: int) -> np.ndarray:
    """A seeded random order of the prompts: the query-agnostic choice of which prompts stay light."""
    return np.random.default_rng(seed).permutation(n)


def mix_features(light: np.ndarray, heavy: np.ndarray, order: np.ndarray, r: float) -> np.ndarray:
    """Features of the served mix: the first round(r n) prompts of ``order`` light, the rest heavy."""
    k = light_count(r, len(order))
    return np.concatenate([light[order[:k]], heavy[order[k:]]])


def mix_fid_curve(light: np.ndarray, heavy: np.ndarray, order: np.ndarray, r_grid: Sequence[float],
                  reference: FeatureStats, *, allow_small: bool = False,
                  progress: Optional[Callable[[int], None]] = None) -> list[float]:
    """FID of the served mix against the reference, for each light-served fraction r (``progress(1)``
    after each: one FID takes seconds at 2048 dimensions)."""
    if light.shape != heavy.shape or light.shape[0] != len(order):
        raise DiffsimError(f"light features {light.shape}, heavy features {heavy.shape} and {len(order)} prompts "
                           f"do not match")
    curve = []
    for r in r_grid:
        curve.append(fid_against(mix_features(light, heavy, order, r), reference, allow_small=allow_small).fid)
        if progress is not None:
            progress(1)
    return curve


# ----------------------------------------------------------------------------------------------
# Generation (through an executor and a feature extractor passed in)


class FeatureExtractor(Protocol):
    dim: int
    name: str

    def features(self, images: list) -> np.ndarray: ...


@dataclass
class StageOutput:
    """One model's pass over the prompts: Inception features (n, d) and, for the light model, confidences."""

    features: np.ndarray
    confidences: Optional[np.ndarray] = None


def image_name(prompt_id: int) -> str:
    return f"{prompt_id:06d}.png"


def run_stage(executor, prompts: Sequence[Prompt], seeds: Sequence[int], *, batch_size: int,
              extractor: Optional[FeatureExtractor], score: bool, save_dir: Optional[Path] = None,
              progress: Optional[Callable[[int], None]] = None) -> StageOutput:
    """Generate one image per prompt in batches; keep features (if ``extractor``), confidences (if ``score``)
    and write PNGs to ``save_dir`` (if given). Images are dropped after each batch, so memory stays flat."""
    if batch_size < 1:
        raise DiffsimError(f"--batch-size must be >= 1, got {batch_size}")
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    feats, confs = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        images = executor.generate([p.text for p in batch], list(seeds[i:i + batch_size]))
        if score:
            confs.append(np.asarray(executor.score(images), dtype=np.float64))
        if extractor is not None:
            feats.append(np.asarray(extractor.features(images), dtype=np.float64))
        if save_dir is not None:
            for p, im in zip(batch, images):
                im.save(save_dir / image_name(p.prompt_id), format="PNG")
        if progress is not None:
            progress(len(batch))
    dim = extractor.dim if extractor is not None else 0
    return StageOutput(
        features=np.concatenate(feats) if feats else np.zeros((0, dim)),
        confidences=np.concatenate(confs) if score else None,
    )


def write_prompt_index(path: Path, prompts: Sequence[Prompt]) -> Path:
    """``image,prompt`` CSV for saved images (the format ``diffsim quality clip-score --prompts`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("image", "prompt"))
        for p in prompts:
            w.writerow((image_name(p.prompt_id), p.text))
    return path


# ----------------------------------------------------------------------------------------------
# The profile


@dataclass
class Calibration:
    """Everything measured, ready to be written as a cascades file."""

    name: str
    light: str
    heavy: str
    slo_s: float
    prompts: list[Prompt]
    confidences: np.ndarray
    thresholds: tuple[float, ...]
    r_grid: tuple[float, ...]
    fid: list[float]
    fid_random_mix: list[float]
    gpu: str
    date: str
    software: dict[str, str] = field(default_factory=dict)
    method: str = ""
    notes: str = ""

    @property
    def deferral(self) -> list[float]:
        return deferral_curve(self.confidences, self.thresholds)


def confidences_path(out: Path) -> Path:
    """``profiles/mine.yaml`` -> ``profiles/mine.confidences.csv`` (beside it, referenced by name)."""
    return out.with_name(out.stem + ".confidences.csv")


def cascades_document(cal: Calibration, confidences_file: Optional[str]) -> dict:
    """The cascades file as plain data, in :class:`diffsim.profiles.CascadesFile`'s layout."""
    spec = {
        "light": cal.light,
        "heavy": cal.heavy,
        "slo_s": cal.slo_s,
        "deferral_curve": {"t": list(cal.thresholds), "f": [round(v, 6) for v in cal.deferral]},
        "fid": {"r": list(cal.r_grid), "fid": [_sig(v) for v in cal.fid], "sample_size": len(cal.prompts)},
        "fid_random_mix": {"r": list(cal.r_grid), "fid": [_sig(v) for v in cal.fid_random_mix],
                           "sample_size": len(cal.prompts)},
    }
    if confidences_file is not None:
        spec["confidences"] = confidences_file
    return {
        "provenance": {"source": SOURCE, "gpu": cal.gpu, "date": cal.date, "software": {str(k): str(v) for k, v in cal.software.items()},
                       "method": cal.method, "notes": cal.notes},
        "cascades": {cal.name: spec},
    }


def _sig(value: float) -> float:
    """Six significant digits: enough for any FID, and exact enough for small-sample test values."""
    return float(f"{value:.6g}")


def write_confidences(path: Path, prompts: Sequence[Prompt], confidences: np.ndarray) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        fh.write("prompt_id,confidence\n")
        for p, c in zip(prompts, confidences):
            fh.write(f"{p.prompt_id},{CONFIDENCE_FORMAT.format(float(c))}\n")
    os.replace(tmp, path)
    return path


def write_calibration(cal: Calibration, out: Path, *, link_confidences: bool = True,
                      check: Optional[Callable[[Path], None]] = None) -> tuple[Path, Path]:
    """Write the confidences CSV and the cascades YAML; ``check(tmp_yaml)`` runs before the YAML is moved into
    place, so a profile that fails validation never replaces a good one. Returns (yaml, csv)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = write_confidences(confidences_path(out), cal.prompts, cal.confidences)
    doc = cascades_document(cal, csv_path.name if link_confidences else None)
    header = (
        f"# Quality profile of cascade {cal.name} ({cal.light} -> {cal.heavy}) measured by `{SOURCE}` on {cal.date}.\n"
        f"# deferral_curve: fraction of the {len(cal.prompts)} calibration prompts whose light image scores a\n"
        "#   discriminator confidence below t. fid: FID of the served mix vs the real images when the fraction r\n"
        "#   with the highest confidence is served light; fid_random_mix: the same with a random choice.\n"
        f"# Per-prompt confidences: {csv_path.name}.\n"
    )
    text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    tmp = out.with_name(out.name + ".tmp.yaml")
    try:
        tmp.write_text(text)
        if check is not None:
            check(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out, csv_path


def validate_profile(path: Path, name: str, gpu_profile: Path) -> "object":
    """Load the written file the way the simulator and server do and ask the allocator for one plan.

    Returns that plan. Raises a DiffsimError (naming ``path``) when any step refuses the file.
    """
    from ..allocator import allocate
    from ..runtime.confidence import read_confidences
    from ..profiles import load_cascade, load_cascades

    load_cascades(path)
    cascade = load_cascade(name, gpu_profile, path)
    if cascade.confidences_path is not None:
        read_confidences(cascade.confidences_path)
    return allocate(cascade, gpus=2, demand_qps=1.0)
