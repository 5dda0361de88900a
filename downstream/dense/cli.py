"""``mimscale detect`` and ``mimscale segment``: fine-tune a pretrained ViT on COCO / ADE20K.

    mimscale detect backbone.checkpoint=runs/mae/checkpoints/step_00100000 data.root=/data/coco
    mimscale segment backbone.checkpoint=mae_pretrain_vit_base.pth backbone.name=mae_vit_base_patch16 \\
        data.root=/data/ADEChallengeData2016
    torchrun --nproc-per-node 8 -m mimscale detect ...          # the papers' 8-GPU setting

``--synthetic N`` first writes N generated images (and N/4 for evaluation) in the dataset's layout,
so both commands run anywhere, CPU included.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mimscale.config import to_yaml

OVERRIDES_HELP = ("options as key=value, e.g. backbone.checkpoint=PATH data.root=PATH optim.lr=1e-4 "
                  "(--print-config lists them all)")


def _add(sub, name: str, help: str, description: str, func, layout: str) -> None:
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--config", default=None, help="YAML file of options (key=value overrides win)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help=f"write N generated training images (+ N/4 for evaluation) in {layout} layout "
                        "to data.root (default <output.dir>/data) first")
    p.add_argument("--synthetic-size", type=int, default=128, metavar="PX", help="side of generated images")
    p.add_argument("--print-config", action="store_true", help="print the resolved options and exit")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=func)


def register(sub) -> None:
    _add(sub, "detect", "COCO Mask R-CNN fine-tuning of a pretrained ViT (ViTDet)",
         "Mask R-CNN + simple feature pyramid on a pretrained ViT (mimscale checkpoint, MAE or timm "
         "file); COCO-layout data; 1x schedule with large-scale jitter by default; box and mask AP "
         "with pycocotools. Single process or under torchrun.", _cmd_detect, "COCO")
    _add(sub, "segment", "ADE20K UperNet fine-tuning of a pretrained ViT",
         "UperNet + auxiliary FCN head on a pretrained ViT; ADE20K-layout data (150 classes, "
         "reduce_zero_label); 512 crops, 160k iterations by default; sliding-window mIoU / mAcc / aAcc. "
         "Single process or under torchrun.", _cmd_segment, "ADE20K")


def _synthetic_root(cfg, n: int) -> str:
    root = cfg.data.root or str(Path(cfg.output.dir) / "data")
    print(f"writing {n} + {max(1, n // 4)} generated images to {root}")
    return root


def _cmd_detect(args) -> int:
    from mimscale.data_pipeline.writers import write_coco
    from mimscale.downstream.detect.task import load_detect_config, run_detect

    cfg = load_detect_config(args.overrides, args.config, validate=False)
    if args.synthetic:
        cfg.data.root = _synthetic_root(cfg, args.synthetic)
        write_coco(cfg.data.root, cfg.data.train_split, args.synthetic, args.synthetic_size, seed=0)
        write_coco(cfg.data.root, cfg.data.val_split, max(1, args.synthetic // 4), args.synthetic_size, seed=1)
    return _run(cfg, args, run_detect)


def _cmd_segment(args) -> int:
    from mimscale.data_pipeline.writers import ADE_CLASSES, write_ade20k
    from mimscale.downstream.segment.task import load_segment_config, run_segment

    cfg = load_segment_config(args.overrides, args.config, validate=False)
    if args.synthetic:
        cfg.data.root = _synthetic_root(cfg, args.synthetic)
        cfg.data.num_classes = len(ADE_CLASSES)
        write_ade20k(cfg.data.root, cfg.data.train_split, args.synthetic, args.synthetic_size, seed=0)
        write_ade20k(cfg.data.root, cfg.data.val_split, max(1, args.synthetic // 4), args.synthetic_size, seed=1)
    return _run(cfg, args, run_segment)


def _run(cfg, args, run) -> int:
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    cfg.validate()
    summary = run(cfg)
    where = summary.run_dir / "eval.json"
    print(f"done: {summary.iters} iterations in {summary.wall_time:.1f}s; metrics {where}"
          + (f"; checkpoint {summary.checkpoint}" if summary.checkpoint else ""))
    return 0
