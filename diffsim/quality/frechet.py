"""Distances between sets of image features (numpy/scipy only, no torch): FID and KID.

FID (Heusel et al. 2017) fits a Gaussian to each feature set and reports the Fréchet distance between the two:
``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace term is computed from the eigenvalues
of ``S1^(1/2) S2 S1^(1/2)`` (symmetric, positive semi-definite), which is exact for covariance matrices and
avoids the complex round-off of a general matrix square root.

Sample size matters: a covariance of n samples has rank at most n - 1, so with n <= d (d = feature
dimension, 2048 for Inception pool features) it is singular and FID is biased upward by an amount that
depends on n. :func:`check_sample_size` therefore refuses n <= d unless the caller allows small samples;
every FID is reported with its sample sizes. KID (Bińkowski et al. 2018) is unbiased and fits small
samples better.

Reference statistics (mu, sigma, n and the name of the feature extractor) are stored as ``.npz`` files
read without pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DiffsimError, InputError


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of a feature set; ``feature`` names the extractor so mismatched stats are refused."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature: str = ""

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


@dataclass(frozen=True)
class FidResult:
    fid: float
    n: int  # images in the evaluated set
    ref_n: int  # images behind the reference statistics
    dim: int
    small_sample: bool  # n or ref_n <= dim: the covariance is singular and FID biased upward

    def to_dict(self) -> dict:
        return {"fid": self.fid, "n": self.n, "ref_n": self.ref_n, "feature_dim": self.dim,
                "small_sample": self.small_sample}


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (n - 1 denominator) of ``features`` shaped (n, d), as float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise DiffsimError(f"features must be a 2-D array (n, d), got shape {features.shape}")
    if features.shape[0] < 2:
        raise DiffsimError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise DiffsimError("features contain NaN or infinite values")
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False))
    return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); >= 0 up to round-off."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DiffsimError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                           f"sigma {sigma1.shape} / {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # the exact value is >= 0; clip round-off


def check_sample_size(n: int, dim: int, *, allow_small: bool = False, what: str = "image set") -> bool:
    """Refuse FID on n <= dim samples unless ``allow_small``; returns whether the sample is small.

    With n <= dim the covariance is singular (rank <= n - 1) and FID depends strongly on n, so numbers
    from different sample sizes are not comparable. At least 2 samples are always needed.
    """
    if n < 2:
        raise DiffsimError(f"FID needs at least 2 images in the {what}, got {n}")
    small = n <= dim
    if small and not allow_small:
        raise DiffsimError(
            f"FID on {n} images in the {what} is not meaningful for {dim}-d features: need more than {dim} "
            f"images for a full-rank covariance (use a lower feature dimension, KID, or allow small samples)")
    return small


def fid_against(features: np.ndarray, reference: FeatureStats, *, allow_small: bool = False) -> FidResult:
    """FID of a feature set against reference statistics, with sample sizes and the small-sample check."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != reference.dim:
        raise DiffsimError(f"features of shape {features.shape} do not match the reference's {reference.dim}-d stats")
    small = check_sample_size(features.shape[0], reference.dim, allow_small=allow_small)
    small_ref = check_sample_size(reference.n, reference.dim, allow_small=allow_small, what="reference set")
    mu, sigma = feature_stats(features)
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    return FidResult(fid, int(features.shape[0]), reference.n, reference.dim, small or small_ref)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over ``subsets`` random subsets (drawn without replacement,
    ``subset_size`` from each set) of the unbiased squared MMD with a cubic polynomial kernel.
    Unbiased, so it can be slightly negative when both sets come from one distribution."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DiffsimError(f"KID needs two (n, d) feature arrays of one dimension, got {a.shape} and {b.shape}")
    if subsets < 1:
        raise DiffsimError(f"KID subsets must be >= 1, got {subsets}")
    if subset_size < 2 or subset_size > min(len(a), len(b)):
        raise DiffsimError(f"KID subset size {subset_size} must be in [2, min(n_a, n_b)] "
                           f"(n_a {len(a)}, n_b {len(b)})")
    rng = np.random.default_rng(seed)
    m = subset_size
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        values[i] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                     + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2.0 * kxy.mean())
    return float(values.mean()), float(values.std())


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int, *, feature: str = "") -> Path:
    """Write reference statistics as ``.npz`` (arrays only: readable without pickle)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DiffsimError(f"{path}: reference statistics file must end in .npz")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DiffsimError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(n), feature=np.str_(feature))
    os.replace(tmp, path)
    return path


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by :func:`save_stats` (or any .npz with ``mu`` and ``sigma``; ``n`` is required
    so that every FID can report its reference sample size)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such reference statistics file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma", "n") if k not in data.files]
            if missing:
                raise InputError(f"{path}: missing field {missing[0]!r} (expected mu, sigma, n)")
            mu, sigma, n = data["mu"], data["sigma"], data["n"]
            feature = str(data["feature"]) if "feature" in data.files else ""
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable .npz statistics file ({reason})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"{path}: field 'sigma' has shape {sigma.shape}, expected {(mu.shape[0],) * 2}")
    if n.shape != () or not np.issubdtype(n.dtype, np.integer) or int(n) < 2:
        raise InputError(f"{path}: field 'n' must be an integer >= 2")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{path}: statistics contain NaN or infinite values")
    return FeatureStats(mu.astype(np.float64), sigma.astype(np.float64), int(n), feature)
