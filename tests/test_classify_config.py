"""Configs of the classification commands and the shipped benchmark sweep."""

import pytest
import torch

from mimscale.cli import build_parser, main
from mimscale.config import ConfigError
from mimscale.downstream.classify.cli import config_class
from mimscale.downstream.classify.config import (
    FinetuneConfig,
    KNNRunConfig,
    LinprobeConfig,
    load_classify_config,
)
from mimscale.downstream.sweeps import available_sweeps, expand
from mimscale.pretrain.models import build_mae, to_timm_state_dict


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "vit.pth"
    torch.save(to_timm_state_dict(build_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8,
                                            decoder_depth=1)), path)
    return path


def test_finetune_defaults_follow_mae_per_size(tiny_pth):
    base = load_classify_config(FinetuneConfig, [f"checkpoint={tiny_pth}", "data.dataset=synthetic"])
    assert base.recipe == "mae_vit_base"  # tiny and base: the ViT-B values
    assert (base.schedule.epochs, base.optim.blr, base.optim.layer_decay, base.model.drop_path) == (100, 5e-4, 0.65, 0.1)
    assert (base.augment.mixup, base.augment.cutmix, base.augment.smoothing, base.schedule.warmup_epochs) == (0.8, 1.0, 0.1, 5)
    assert (base.optim.weight_decay, tuple(base.optim.betas), base.model.pool) == (0.05, (0.9, 0.999), "mean")
    large = load_classify_config(FinetuneConfig, ["model.name=mae_vit_large_patch16", "data.dataset=synthetic"])
    assert large.recipe == "mae_vit_large"
    assert (large.schedule.epochs, large.optim.blr, large.optim.layer_decay, large.model.drop_path) == (50, 1e-3, 0.75, 0.2)
    huge = load_classify_config(FinetuneConfig, ["model.name=mae_vit_huge_patch14", "data.dataset=synthetic",
                                                 "optim.layer_decay=0.8"])
    assert huge.model.drop_path == 0.3 and huge.optim.layer_decay == 0.8  # overrides beat the recipe
    lp = load_classify_config(LinprobeConfig, [f"checkpoint={tiny_pth}", "data.dataset=synthetic"])
    assert (lp.optim.blr, lp.data.batch_size, lp.schedule.epochs, lp.schedule.warmup_epochs) == (0.1, 512, 90, 10)
    assert (lp.optim.weight_decay, lp.model.pool) == (0.0, "cls")


def test_regularisers_are_timms_and_follow_the_config(tiny_pth):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from mimscale.downstream.classify.finetune import _criterion, _mixup
    from mimscale.downstream.classify.model import build_vit

    base = [f"checkpoint={tiny_pth}", "data.dataset=synthetic"]
    a = load_classify_config(FinetuneConfig, base).augment
    mix = _mixup(a, 10)
    assert isinstance(mix, Mixup) and isinstance(_criterion(a, True), SoftTargetCrossEntropy)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
    _, soft = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(soft.sum(1), torch.ones(4))  # smoothed, mixed targets
    assert soft.min() >= 0.1 / 10 - 1e-6
    a = load_classify_config(FinetuneConfig, [*base, "augment.mixup=0", "augment.cutmix=0"]).augment
    smooth = _criterion(a, False)
    assert _mixup(a, 10) is None and isinstance(smooth, LabelSmoothingCrossEntropy) and smooth.smoothing == 0.1
    a = load_classify_config(FinetuneConfig, [*base, "augment.mixup=0", "augment.cutmix=0", "augment.smoothing=0"]).augment
    assert type(_criterion(a, False)) is torch.nn.CrossEntropyLoss
    # drop path: stochastic depth rising linearly to model.drop_path in the last block [C]
    vit = build_vit("mae_vit_tiny_patch16", 8, 32, 10, "mean", drop_path=0.2)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in vit.blocks]  # block 0: Identity
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


@pytest.mark.parametrize("overrides,message", [
    (["model.name=mae_vit_base_patch16"], "data.root: required for data.dataset=imagenet"),
    (["data.dataset=synthetic"], "model.name=auto reads the encoder size from the checkpoint"),
    (["checkpoint=/nope", "data.dataset=synthetic"], "checkpoint: /nope does not exist"),
    (["model.name=mae_vit_base_patch16", "data.dataset=cifar10", "data.root=x", "data.eval_split=val"],
     "'val' is not a split of cifar10; valid: auto, train, test"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "data.batch_size=7"], "must be even"),
    (["model.name=mae_vit_base_patch16", "data.dataset=cifar10", "data.root=x", "data.fold=2"], "only dtd"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "model.pool=max"], "valid: cls, mean"),
    (["model.name=mae_vit_base_patch16", "data.datset=synthetic"], "did you mean 'dataset'"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "eval_only=true"], "eval_only: needs checkpoint"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "data.subset=0.1", "data.subset_file=x"],
     "give one"),
    (["model.name=mae_vit_base_patch16", "data.dataset=mnist"], "valid: imagenet, imagefolder, inat2018"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.backend=zero"],
     "engine.backend.*valid: ddp, fsdp, deepspeed"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.backend=fsdp", "ema.enabled=true"],
     "ema.enabled: the EMA of the weights is kept with engine.backend=ddp only"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.backend=deepspeed", "ema.enabled=true"],
     r"ema.enabled: the EMA of the weights is kept with engine.backend=ddp only \(not deepspeed\)"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.cpu_offload=true"],
     "engine.cpu_offload: offloads the shards of fsdp or deepspeed; engine.backend=ddp has none"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.deepspeed_config=ds.json"],
     "engine.deepspeed_config: only used with engine.backend=deepspeed"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.backend=deepspeed",
      "engine.deepspeed_config=/nope.json"], "engine.deepspeed_config: file /nope.json does not exist"),
    (["model.name=mae_vit_base_patch16", "data.dataset=synthetic", "engine.backend=deepspeed",
      "engine.zero_stage=4"], "engine.zero_stage.*valid: 1, 2, 3"),
])
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_classify_config(FinetuneConfig, overrides)


@pytest.mark.parametrize("backend", [["engine.backend=fsdp"], ["engine.backend=deepspeed", "engine.zero_stage=3"]])
def test_sharded_backends_are_offered_where_something_trains(backend):
    base = ["model.name=mae_vit_base_patch16", "data.dataset=synthetic", *backend]
    for cls in (FinetuneConfig, LinprobeConfig):
        engine = load_classify_config(cls, base).engine
        assert (engine.backend, engine.zero_stage) == (backend[0].split("=")[1], 3 if len(backend) > 1 else 2)
    with pytest.raises(ConfigError, match="not offered by mimscale knn; valid: ddp .k-NN trains nothing"):
        load_classify_config(KNNRunConfig, base)


def test_cli_prints_config_and_reports_config_errors(capsys):
    assert main(["finetune", "--print-config", "model.name=mae_vit_base_patch16", "data.dataset=synthetic"]) == 0
    assert "layer_decay: 0.65" in capsys.readouterr().out
    assert main(["knn", "model.name=mae_vit_base_patch16", "knn.k=0", "data.dataset=synthetic"]) == 2
    assert "knn.k: 0 is out of range" in capsys.readouterr().err


def test_standard_sweep_expands_to_valid_commands(tiny_pth, tmp_path):
    assert "standard" in available_sweeps()
    jobs = expand("standard", {"checkpoint": str(tiny_pth), "data": "/datasets", "out": str(tmp_path)})
    names = [j.name for j in jobs]
    assert {"in1k_finetune", "in1k_linprobe", "in1k_knn", "in1k_semi_0.01", "in1k_semi_0.1",
            "transfer_inat2018", "transfer_small_cifar100", "transfer_small_dtd"} <= set(names)
    assert len(names) == len(set(names)) == 14
    parser = build_parser()
    for job in jobs:
        args = parser.parse_args(job.argv)
        cfg = load_classify_config(config_class(job.argv[0]), args.overrides)
        assert cfg.output.dir == f"{tmp_path}/{job.name}" and cfg.checkpoint == str(tiny_pth)
    assert "data.root=/datasets/flowers102" in next(j for j in jobs if j.name == "transfer_small_flowers102").argv
    with pytest.raises(ValueError, match=r"\{checkpoint\} has no value"):
        expand("standard", {})
    with pytest.raises(ValueError, match="unknown variable"):
        expand("standard", {"ckpt": "x"})
