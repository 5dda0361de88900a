"""Layer-wise learning-rate decay (BEiT, MAE, ViTDet): the deeper a block, the larger its lr.

A parameter of depth ``i`` (0 = patch embedding and position table, ``k+1`` = block ``k``,
``L+1`` = everything after the encoder: neck and heads) trains at ``lr · decay^(L+1−i)``.
"""

from __future__ import annotations

from torch import nn


def layer_id(name: str, num_layers: int, backbone_prefix: str = "backbone.") -> int:
    """Depth of parameter ``name`` in a model whose encoder lives under ``backbone_prefix``."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    local = name[len(backbone_prefix):]
    if local.startswith(("patch_embed", "pos_embed", "cls_token")):
        return 0
    if local.startswith("blocks."):
        return int(local.split(".")[1]) + 1
    return num_layers + 1


def layer_decay_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                             num_layers: int, backbone_prefix: str = "backbone.") -> list[dict]:
    """AdamW groups with ``lr`` already scaled per depth and the scale kept as ``lr_scale`` (the
    backend's ``set_lr`` multiplies by it). Biases, norms and position tables get no weight decay."""
    skip = {f"{backbone_prefix}{n}" for n in getattr(_get(model, backbone_prefix), "no_weight_decay", set)()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_id(name, num_layers, backbone_prefix)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        scale = layer_decay ** (num_layers + 1 - depth)
        group = groups.setdefault((depth, no_decay), {
            "params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": scale, "lr": lr * scale})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _get(model: nn.Module, prefix: str):
    node = model
    for part in prefix.rstrip(".").split("."):
        if not part:
            continue
        node = getattr(node, part, None)
        if node is None:
            return None
    return node
