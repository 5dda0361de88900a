"""ViT encoder + MAE decoder with an explicit mask, timm-compatible weights."""

from .export import LoadResult, load_mae_checkpoint, to_timm_state_dict
from .factory import MODEL_SIZES, available_models, build_mae
from .mae import MAEOutput, MaskedAutoencoderViT

__all__ = [
    "MODEL_SIZES",
    "LoadResult",
    "MAEOutput",
    "MaskedAutoencoderViT",
    "available_models",
    "build_mae",
    "load_mae_checkpoint",
    "to_timm_state_dict",
]
