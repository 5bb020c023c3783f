"""Online image quality of a running server: FID of a rolling sample of served images, per time window.

Why a sample: FID needs Inception features of many images, and a busy server makes far more images than an
extractor beside it can featurise. Each window of ``window_s`` seconds (engine clock) keeps a uniform random
sample of at most ``sample`` of the images served in it (reservoir sampling, Algorithm R: after m images each
has probability sample/m of being in it), so memory and feature work are bounded whatever the load.

Division of work:

* the request path calls :meth:`QualityMonitor.offer` for each completed image: a reservoir decision under
  a lock and, when the image enters the sample, a non-blocking put on a bounded queue -- never a decode or
  a forward pass (when the queue is full the image is counted as ``skipped``, not waited for);
* one background thread decodes the sampled PNGs and computes their Inception features
  (:class:`diffsim.quality.features.InceptionFeatures`, local weights), in batches;
* when a window is over (its end plus :data:`CLOSE_GRACE_S` has passed and nothing of it is queued), the
  thread computes the FID of its sample against the reference statistics
  (:func:`diffsim.quality.frechet.fid_against`) for all images and per serving stage (light, heavy), each
  with its sample size. A sample too small for the feature dimension (see
  :func:`~diffsim.quality.frechet.check_sample_size`: the covariance would be singular) gets the reason
  instead of a number.

A sampled image that replaces an earlier one in the reservoir takes that one's slot, so the features kept
at the window's end are exactly those of the final sample.
"""

from __future__ import annotations

import io
import logging
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DiffsimError, InputError
from ..quality.frechet import FeatureStats, check_sample_size, fid_against, load_stats

log = logging.getLogger("diffsim.server")

STAGES = ("all", "light", "heavy")
CLOSE_GRACE_S = 0.5  # a window is closed this long after its end (images stamped just before it get in)
HISTORY = 1440  # closed windows kept (a day of one-minute windows)
QUEUE_SIZE = 256  # sampled images waiting for features, at most
POLL_S = 0.2  # the thread checks for windows to close at least this often


@dataclass(frozen=True)
class StageQuality:
    """FID of one stage's sample in a window, or why there is none."""

    n: int  # images in the sample
    fid: Optional[float]
    reason: str = ""  # set when fid is None

    def to_dict(self) -> dict:
        return {"n": self.n, "fid": self.fid, "reason": self.reason or None}


@dataclass(frozen=True)
class WindowQuality:
    start_s: float
    end_s: float
    served: dict[str, int]  # images served in the window, per stage ("all" included)
    skipped: int  # sampled images lost because the feature queue was full
    stages: dict[str, StageQuality]  # "all", "light", "heavy"

    def to_dict(self) -> dict:
        overall = self.stages["all"]
        return {"start_s": self.start_s, "end_s": self.end_s, "n": overall.n, "fid": overall.fid,
                "reason": overall.reason or None, "served": dict(self.served), "skipped": self.skipped,
                "stages": {s: q.to_dict() for s, q in self.stages.items()}}


class Reservoir:
    """Algorithm R over a stream: :meth:`offer` says which slot the new item takes, or None (not sampled)."""

    def __init__(self, size: int, rng: random.Random):
        self.size = size
        self.rng = rng
        self.seen = 0
        self.filled = 0

    def offer(self) -> Optional[int]:
        self.seen += 1
        if self.filled < self.size:
            self.filled += 1
            return self.filled - 1
        j = self.rng.randrange(self.seen)
        return j if j < self.size else None


def stage_quality(features: np.ndarray, reference: FeatureStats) -> StageQuality:
    """FID of ``features`` against ``reference``; the sample-size rule's message when it is too small."""
    n, dim = int(features.shape[0]), reference.dim
    try:
        small = check_sample_size(n, dim, allow_small=True, what="window's sample")
    except DiffsimError as e:  # fewer than 2 images
        return StageQuality(n, None, str(e))
    if small:
        return StageQuality(n, None, f"FID on {n} images is not meaningful for {dim}-d features: need more than "
                                     f"{dim} for a full-rank covariance (more traffic, a longer --fid-window-s, a "
                                     f"larger --fid-sample, or reference statistics at a lower feature dimension)")
    return StageQuality(n, fid_against(features, reference).fid)


def window_quality(samples: dict[int, tuple[str, np.ndarray]], reference: FeatureStats) -> dict[str, StageQuality]:
    """Per stage ("all", "light", "heavy"): the FID of a window's sample (slot -> (stage, features))."""
    result = {}
    for stage in STAGES:
        rows = [f for s, f in samples.values() if stage == "all" or s == stage]
        feats = np.stack(rows) if rows else np.zeros((0, reference.dim))
        result[stage] = stage_quality(feats, reference)
    return result


@dataclass
class _Window:
    index: int
    reservoir: Reservoir
    served: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    skipped: int = 0


@dataclass(frozen=True)
class _Sampled:
    window: int
    slot: int
    stage: str
    png: bytes


class QualityMonitor:
    """Samples served images per window and reports their FID against reference statistics.

    ``extractor``: anything with ``features(list of PIL images) -> (n, dim) array`` and ``dim`` (an
    :class:`~diffsim.quality.features.InceptionFeatures`); ``clock``: seconds on the clock ``offer`` is given
    times on (the engine's).
    """

    def __init__(self, extractor, reference: FeatureStats, *, window_s: float = 60.0, sample: Optional[int] = None,
                 clock: Callable[[], float], seed: int = 0, queue_size: int = QUEUE_SIZE,
                 feature_name: str = ""):
        if not window_s > 0:
            raise DiffsimError(f"--fid-window-s: must be > 0, got {window_s}")
        if extractor.dim != reference.dim:
            raise DiffsimError(f"the extractor makes {extractor.dim}-d features, the reference is {reference.dim}-d")
        self.extractor = extractor
        self.reference = reference
        self.window_s = float(window_s)
        self.sample = int(sample) if sample is not None else default_sample(reference.dim)
        if self.sample < 2:
            raise DiffsimError(f"--fid-sample: must be >= 2, got {self.sample}")
        if self.sample <= reference.dim:
            log.warning("--fid-sample %d is not more than the %d-d feature: no window will have a FID",
                        self.sample, reference.dim)
        self.feature_name = feature_name
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._windows: dict[int, _Window] = {}  # open windows (the request path adds, the thread removes)
        self._closed_upto = -1  # windows <= this are closed
        self._queue: queue.Queue[Optional[_Sampled]] = queue.Queue(maxsize=queue_size)
        self._features: dict[int, dict[int, tuple[str, np.ndarray]]] = {}  # window -> slot -> (stage, features)
        self.history: deque[WindowQuality] = deque(maxlen=HISTORY)
        self.late = 0  # sampled images whose window had closed before their features were in (never expected)
        self.errors = 0
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # -- the request path ---------------------------------------------------------------------------------

    def offer(self, png: bytes, stage: str, now: float) -> None:
        """An image was served at ``now``: maybe sample it. Cheap and never blocks."""
        index = int(now // self.window_s)
        with self._lock:
            if index <= self._closed_upto or self._stopping:
                self.late += 1
                return
            window = self._windows.get(index)
            if window is None:
                window = self._windows[index] = _Window(index, Reservoir(self.sample, self._rng))
            window.served["all"] += 1
            window.served[stage] = window.served.get(stage, 0) + 1
            slot = window.reservoir.offer()
            if slot is None:
                return
            try:
                self._queue.put_nowait(_Sampled(index, slot, stage, png))
            except queue.Full:
                window.skipped += 1

    # -- reading ------------------------------------------------------------------------------------------

    def windows(self) -> list[WindowQuality]:
        with self._lock:
            return list(self.history)

    def latest(self) -> Optional[WindowQuality]:
        with self._lock:
            return self.history[-1] if self.history else None

    def describe(self) -> dict:
        """``GET /v1/quality``: settings, the closed windows (oldest first) and the window being filled."""
        now = self._clock()
        index = int(now // self.window_s)
        with self._lock:
            current = self._windows.get(index)
            windows = [w.to_dict() for w in self.history]
            late, errors = self.late, self.errors
        return {
            "feature": self.feature_name or None,
            "feature_dim": self.reference.dim,
            "reference_n": self.reference.n,
            "window_s": self.window_s,
            "sample": self.sample,
            "now_s": now,
            "current": {"start_s": index * self.window_s, "end_s": (index + 1) * self.window_s,
                        "served": dict(current.served) if current else {s: 0 for s in STAGES},
                        "sampled": current.reservoir.filled if current else 0},
            "windows": windows,
            "late": late,
            "errors": errors,
        }

    # -- the background thread ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="diffsim-quality", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Featurise what is queued, close every open window (the last one partial) and end the thread."""
        with self._lock:
            self._stopping = True
        if self._thread is None:
            self._close_due(final=True)
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                self._close_due()
                continue
            items = [first]
            while len(items) < getattr(self.extractor, "batch_size", 32) and items[-1] is not None:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            self._featurise([it for it in items if it is not None])
            if stop:
                self._close_due(final=True)
                return
            self._close_due()

    def _featurise(self, items: list[_Sampled]) -> None:
        if not items:
            return
        # Close the windows older than these items first: FIFO, so nothing of theirs is still queued. (Not
        # by the clock here: these items are out of the queue but not featurised yet.)
        self._close_due(before=min(it.window for it in items), by_clock=False)
        from PIL import Image

        try:
            images = [Image.open(io.BytesIO(it.png)).convert("RGB") for it in items]
            feats = np.asarray(self.extractor.features(images), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - a bad image or extractor error loses these samples only
            log.error("quality monitor: features failed for %d images: %s: %s", len(items), type(e).__name__, e)
            with self._lock:
                self.errors += len(items)
            return
        for it, f in zip(items, feats):
            if it.window <= self._closed_upto:
                with self._lock:
                    self.late += 1
                continue
            self._features.setdefault(it.window, {})[it.slot] = (it.stage, f)

    def _close_due(self, *, before: Optional[int] = None, final: bool = False, by_clock: bool = True) -> None:
        """Close the open windows that are over: those before window ``before``, all of them (``final``),
        and (``by_clock``) those whose end plus the grace has passed while nothing is queued or being
        featurised -- the thread calls it so only between batches."""
        now = self._clock()
        with self._lock:
            due = []
            for index in sorted(self._windows):
                over = (before is not None and index < before) or final or (
                    by_clock and self._queue.empty() and now >= (index + 1) * self.window_s + CLOSE_GRACE_S)
                if over:
                    due.append(self._windows.pop(index))
                    self._closed_upto = max(self._closed_upto, index)
        for window in due:
            samples = self._features.pop(window.index, {})
            result = WindowQuality(window.index * self.window_s, (window.index + 1) * self.window_s,
                                   dict(window.served), window.skipped, window_quality(samples, self.reference))
            with self._lock:
                self.history.append(result)
            overall = result.stages["all"]
            log.info("served FID %s over [%g, %g) s (n=%d of %d served)",
                     "-" if overall.fid is None else f"{overall.fid:.3f}", result.start_s, result.end_s,
                     overall.n, window.served["all"])


def default_sample(dim: int) -> int:
    """Twice the feature dimension: enough images for a full-rank covariance with room to spare."""
    return 2 * dim


def build_quality_monitor(reference_path: str | Path, weights_path: str | Path, *, clock: Callable[[], float],
                          window_s: float = 60.0, sample: Optional[int] = None, device: str = "cpu",
                          seed: int = 0) -> QualityMonitor:
    """The monitor for ``diffsim serve --fid-reference``: reference statistics, and an Inception extractor
    from the local weights at the reference's feature dimension; refuses statistics from another extractor
    or from too few images."""
    from ..quality import features

    reference = check_reference(reference_path)
    extractor = features.InceptionFeatures(weights_path, dim=reference.dim, device=device)
    if reference.feature and reference.feature != extractor.name:
        raise InputError(f"{reference_path}: statistics come from feature extractor {reference.feature!r}, not "
                         f"{extractor.name!r} (--inception-weights {weights_path}): FIDs across extractors are "
                         f"not comparable")
    if not reference.feature:
        log.warning("%s: the statistics do not name their feature extractor; assuming %s", reference_path,
                    extractor.name)
    return QualityMonitor(extractor, reference, window_s=window_s, sample=sample, clock=clock, seed=seed,
                          feature_name=extractor.name)


def check_reference(path: str | Path) -> FeatureStats:
    """Reference statistics usable for serving FID: readable, at an Inception feature dimension, and from
    more images than that dimension."""
    from ..quality.features import INCEPTION_LAYERS

    reference = load_stats(path)
    if reference.dim not in INCEPTION_LAYERS:
        raise InputError(f"{path}: statistics are {reference.dim}-d; Inception features are one of "
                         f"{sorted(INCEPTION_LAYERS)}")
    try:
        check_sample_size(reference.n, reference.dim, what="reference set")
    except DiffsimError as e:
        raise InputError(f"{path}: {e}") from None
    return reference
