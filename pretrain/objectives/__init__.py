"""Objectives (SPEC §2–7): each a small module or function, tested against its equation."""

from .contrast import MLPHead, ccmim_align, ccmim_code, ccmim_nce, gather_with_grad, infonce
from .mam import MAMDecoder, MAMHead, mam_loss, zscore
from .pixel import global_count, shot_weighted_pixel_loss

__all__ = ["MAMDecoder", "MAMHead", "MLPHead", "ccmim_align", "ccmim_code", "ccmim_nce", "gather_with_grad",
           "global_count", "infonce", "mam_loss", "shot_weighted_pixel_loss", "zscore"]
