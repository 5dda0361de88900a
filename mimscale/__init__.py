"""mimscale: masked-image-modeling pretraining of Vision Transformers at scale."""

__version__ = "0.1.0"
