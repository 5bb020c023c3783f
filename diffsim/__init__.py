"""diffsim: query-aware model scaling for text-to-image diffusion cascades (DiffServe), and its simulator."""

__version__ = "0.1.0"
