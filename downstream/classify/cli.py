"""``mimscale finetune``, ``mimscale linprobe`` and ``mimscale knn``."""

from __future__ import annotations

import sys

from mimscale.config import to_yaml

# command -> (its config class in .config, imported when the command runs; summary; description)
_COMMANDS = {
    "finetune": ("FinetuneConfig", "fine-tune a pretrained ViT on a classification data set (MAE's recipe)",
                 "End-to-end fine-tuning from a mimscale checkpoint, an official MAE .pth or a timm "
                 "state dict: layer-wise lr decay, drop path, mixup/cutmix, label smoothing, optional "
                 "EMA; reports top-1/top-5 and robustness to occluded and shuffled patches. "
                 "Example: mimscale finetune checkpoint=runs/mae data.dataset=cifar100 data.root=/data/cifar"),
    "linprobe": ("LinprobeConfig", "linear probe of a frozen encoder (MAE's protocol: BatchNorm + linear, LARS)",
                 "Train BatchNorm(affine=False) + a linear layer on the frozen encoder's CLS (or mean) "
                 "features with LARS. Example: mimscale linprobe checkpoint=runs/mae data.root=/data/in1k"),
    "knn": ("KNNRunConfig", "weighted k-NN accuracy of a frozen encoder (k=20, T=0.07)",
            "Cosine k-NN over the training split's features with exp(sim/T) voting (DINO's protocol). "
            "Example: mimscale knn checkpoint=runs/mae data.dataset=imagenet data.root=/data/in1k"),
}


def config_class(command: str) -> type:
    """The config class of ``command`` (importing it needs torch, so only when a command runs)."""
    from . import config

    return getattr(config, _COMMANDS[command][0])


def _handler(command: str):
    def run(args) -> int:
        from .config import load_classify_config

        cfg = load_classify_config(config_class(command), args.overrides, args.config)
        if args.print_config:
            sys.stdout.write(to_yaml(cfg))
            return 0
        if command == "finetune":
            from .finetune import run_finetune

            run_finetune(cfg)
        elif command == "linprobe":
            from .linprobe import run_linprobe

            run_linprobe(cfg)
        else:
            from .knn_eval import run_knn

            run_knn(cfg)
        return 0
    return run


def register(sub) -> None:
    for command, (_, summary, description) in _COMMANDS.items():
        p = sub.add_parser(command, help=summary, description=description)
        p.add_argument("--config", default=None, help="YAML file of options (overrides apply on top)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="options as key=value, e.g. data.dataset=cifar10 "
                       "optim.blr=1e-3 (--print-config lists every key)")
        p.set_defaults(func=_handler(command))
