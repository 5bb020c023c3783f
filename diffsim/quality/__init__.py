"""Image-quality metrics: FID and KID from feature statistics (numpy, :mod:`.frechet`), feature extraction
and CLIP score (torch, :mod:`.features`, imported only when asked for), image folders (:mod:`.images`).

Importing this package does not import torch.
"""

from .frechet import (
    FeatureStats,
    FidResult,
    check_sample_size,
    feature_stats,
    fid_against,
    frechet_distance,
    kid,
    load_stats,
    save_stats,
)

__all__ = [
    "FeatureStats",
    "FidResult",
    "check_sample_size",
    "feature_stats",
    "fid_against",
    "frechet_distance",
    "kid",
    "load_stats",
    "save_stats",
]
