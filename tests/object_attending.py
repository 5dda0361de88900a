"""Hand-set ViT weights that single out the synthetic images' objects, so guided masking can be
checked against known objects without any training.

``install_object_attention``: block 0 turns colour differences into a "saturation" channel (the
parts of |R−G| and |G−B| above a threshold that muted backgrounds stay under, through GELUs) and
removes the raw differences from the residual stream (GELU(x) − GELU(−x) = x); the last block's
keys read that channel while its queries are constant, so every query — CLS included — attends to
the most saturated patches: CLS attention, ccMIM importance and GPA all rank patches by it. The
blocks between are zero (identity residuals).

``install_object_salience``: the patch embedding is the patch's colour minus grey, large, with no
positional term, so strongly coloured (object) tokens dominate the affinity ``X Xᵀ`` of SBAM.
"""

import torch

from mimscale.data_pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimscale.tools.common import synthetic_with_foreground

SAT = 4  # residual channel holding the saturation feature


@torch.no_grad()
def install_object_attention(model, gain: float = 2.0, threshold: float = 1.5):
    p = model.patch_size
    for t in [model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token, *model.blocks.parameters()]:
        t.zero_()
    for blk in model.blocks:
        blk.norm1.weight.fill_(1.0)
        blk.norm2.weight.fill_(1.0)
    w = model.patch_embed.proj.weight  # [D, 3, p, p]: channels 0..3 = ±(R−G), ±(G−B) patch means
    for c, (a, b, sign) in enumerate([(0, 1, 1), (1, 2, 1), (0, 1, -1), (1, 2, -1)]):
        w[c, a] = sign * gain / (p * p)
        w[c, b] = -sign * gain / (p * p)
    mlp = model.blocks[0].mlp
    for c in range(4):
        mlp.fc1.weight[c, c] = 1.0                  # saturation = Σ GELU(±difference − threshold)
        mlp.fc1.bias[c] = -gain * threshold
        mlp.fc2.weight[SAT, c] = 4.0
        mlp.fc1.weight[4 + c, c] = 1.0              # and cancel the raw difference channels
        mlp.fc1.weight[8 + c, c] = -1.0
        mlp.fc2.weight[c, 4 + c] = -1.0
        mlp.fc2.weight[c, 8 + c] = 1.0
    attn = model.blocks[-1].attn                    # q = constant, k = saturation, in every head
    d, D = attn.head_dim, attn.num_heads * attn.head_dim
    for head in range(attn.num_heads):
        attn.qkv.bias[head * d] = 1.0
        attn.qkv.weight[D + head * d, SAT] = 4.0
    return model


@torch.no_grad()
def install_object_salience(model, gain: float = 1.0):
    p = model.patch_size
    grey = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]  # a grey pixel, normalised
    model.patch_embed.proj.weight.zero_()
    model.patch_embed.proj.bias.zero_()
    for c in range(3):
        model.patch_embed.proj.weight[c, c] = gain / (p * p)
        model.patch_embed.proj.bias[c] = -gain * grey[c]
    model.pos_embed.zero_()
    return model


def synthetic_batch(n: int, size: int = 64, patch: int = 8, seed: int = 0):
    """Normalised images ``[n, 3, size, size]`` and patch foreground ``[n, N]``."""
    return synthetic_with_foreground(n, size, patch, seed)


def object_coverage(mask: torch.Tensor, fg: torch.Tensor) -> tuple[float, float]:
    """(fraction of object patches hidden, fraction of background patches hidden)."""
    return float((mask & fg).sum() / fg.sum()), float((mask & ~fg).sum() / (~fg).sum())
