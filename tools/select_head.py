"""``mimscale select-head``: GPA's few-shot head selection (SPEC §3, seed 001 sec. 3.4).

For every (block, head), hide the top ``N−K`` GPA patches of a few images whose objects are known
and score the recall of the foreground, ``|mask ∩ fg| / |fg|`` — pooled over images, or the mean of
per-image recalls. The best pair is what ``masking.gpa.block`` / ``masking.gpa.head`` should be.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
# torch and the masking code are imported inside the functions: building the command line imports
# this module, and ``mimscale --help`` should not load torch


def register(sub) -> None:
    p = sub.add_parser("select-head", help="GPA few-shot head selection: recall of object patches per (block, head)")
    p.add_argument("--checkpoint", default=None, help="mimscale checkpoint folder or official MAE .pth (the teacher)")
    p.add_argument("--num-images", type=int, default=32, help="images with known objects (synthetic)")
    p.add_argument("--ratio", type=float, default=None, help="mask ratio (default masking.ratio)")
    p.add_argument("--pooling", choices=("pooled", "mean"), default="pooled",
                   help="pool patches over images [P], or average per-image recalls")
    p.add_argument("--queries", choices=("patches", "all"), default="patches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides (model.*, masking.ratio)")
    p.set_defaults(func=run)


def head_recalls(encoder, images: torch.Tensor, fg: torch.Tensor, ratio: float, pooling: str = "pooled",
                 queries: str = "patches") -> torch.Tensor:
    """``[blocks, heads]`` recall of the foreground by the top-GPA mask of each head."""
    import torch

    from mimscale.pretrain.masking import functional as F
    from mimscale.pretrain.masking.scoring import input_tokens
    from mimscale.pretrain.masking.selectors import masked_counts, topk_mask

    with torch.no_grad():
        counts = masked_counts(fg.shape[1], ratio, fg.shape[0])
        x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]).expand(images.shape[0], -1, -1),
                       input_tokens(encoder, images)], dim=1)
        rows = []
        for blk in encoder.blocks:  # one pass: each block's q, k on its own input
            q, k = blk.attn.qk(blk.norm1(x))
            g = F.global_patch_attention(q, k, queries)               # [B, h, N]
            hits = []
            for h in range(g.shape[1]):
                m = topk_mask(g[:, h], counts)
                if pooling == "pooled":
                    hits.append((m & fg).sum() / fg.sum().clamp_min(1))
                else:
                    per = (m & fg).sum(1) / fg.sum(1).clamp_min(1)
                    hits.append(per[fg.any(1)].mean())
            rows.append(torch.stack(hits))
            x = blk(x)
        return torch.stack(rows).float()


def run(args: argparse.Namespace) -> int:
    from mimscale.pretrain.method import build_model

    from .common import config_for, load_student_weights, synthetic_with_foreground

    cfg = config_for(args.checkpoint, args.overrides)
    model = build_model(cfg).eval()
    load_student_weights(model, args.checkpoint)
    ratio = args.ratio if args.ratio is not None else cfg.masking.ratio
    images, fg = synthetic_with_foreground(args.num_images, cfg.model.img_size, model.patch_size, args.seed)
    recalls = head_recalls(model, images, fg, ratio, args.pooling, args.queries)
    heads = recalls.shape[1]
    print(f"GPA head selection: recall of object patches by the top {ratio:.0%} GPA patches "
          f"({args.num_images} synthetic images, {args.pooling}); random masking recalls {ratio:.2f}")
    print("block | " + " ".join(f"h{h:<5d}" for h in range(heads)))
    for b, row in enumerate(recalls.tolist()):
        print(f"{b:5d} | " + " ".join(f"{v:.3f} " for v in row))
    best = int(recalls.argmax())
    block, head = divmod(best, heads)
    print(f"best: block {block}, head {head} (recall {recalls[block, head]:.3f}) -> "
          f"masking.gpa.block={block} masking.gpa.head={head}")
    return 0
