"""The OpenMMLab plugin: shipped configs build Mask R-CNN (mmdet) and UperNet (mmseg) on the
mimscale adapter, load a `mimscale convert` checkpoint strictly, and train a step on generated data.

CI installs the extra as declared (mmcv-lite, no compiled ops), so these run on the plugin's own
torchvision kernels, as a user's would.
"""

import dense_support
import pytest
import torch
from extras import need

from mimscale.cli import main
from mimscale.data_pipeline.synthetic import CLASSES

tiny_mae_checkpoint = dense_support.tiny_mae_checkpoint
synthetic_coco = dense_support.synthetic_coco
synthetic_ade = dense_support.synthetic_ade

CONFIGS = {
    "mask_rcnn_vit-b_1x_coco.py": ("mae_vit_base_patch16", 768, 12, 0.7, "mmdet"),
    "mask_rcnn_vit-l_1x_coco.py": ("mae_vit_large_patch16", 1024, 24, 0.8, "mmdet"),
    "upernet_vit-b_160k_ade20k.py": ("mae_vit_base_patch16", 768, 12, 0.65, "mmseg"),
    "upernet_vit-l_160k_ade20k.py": ("mae_vit_large_patch16", 1024, 24, 0.75, "mmseg"),
}


@pytest.fixture(scope="module")
def openmmlab():
    for module in ("mmengine", "mmcv", "mmdet", "mmseg"):
        need(module)
    import mimscale.downstream.openmmlab as plugin

    return plugin


def _load(plugin, name):
    from mmengine.config import Config

    return Config.fromfile(str(plugin.config_path(name)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_carry_the_papers_settings(openmmlab, name):
    arch, width, depth, decay, target = CONFIGS[name]
    cfg = _load(openmmlab, name)
    b = cfg.model.backbone
    assert b.type == "MimViT" and b.arch == arch
    assert b.init_cfg.type == "Pretrained" and b.init_cfg.checkpoint.endswith(f"_{target}.pth")
    assert cfg.optim_wrapper.constructor == "MimLayerDecayOptimizerConstructor"
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=depth, layer_decay_rate=decay)
    assert cfg.custom_imports.imports == ["mimscale.downstream.openmmlab"]
    if target == "mmdet":
        assert cfg.model.neck.in_channels == width and cfg.train_cfg.max_epochs == 12
        assert cfg.param_scheduler[1].milestones == [9, 11] and b.img_size == 1024
        assert b.global_blocks == [depth // 4 * k - 1 for k in (1, 2, 3, 4)]
    else:
        assert cfg.model.decode_head.in_channels == [width] * 4 and cfg.train_cfg.max_iters == 160000
        assert cfg.model.decode_head.num_classes == 150 and cfg.model.test_cfg.stride == (341, 341)
        assert b.out_indices == "quarters" and b.window_size == 0


def test_registries_hold_the_plugin_modules(openmmlab):
    import mmdet.registry
    import mmseg.registry

    for reg in (mmdet.registry, mmseg.registry):
        for name in ("MimViT", "MimSimpleFPN", "MimMultiLevelNeck", "MimLN2d"):
            assert name in reg.MODELS.module_dict
        assert "MimLayerDecayOptimizerConstructor" in reg.OPTIM_WRAPPER_CONSTRUCTORS.module_dict


def test_convert_writes_the_file_mimvit_loads_strictly(openmmlab, tiny_mae_checkpoint, tmp_path, capsys):
    from mimscale.pretrain.engine.checkpoint import load_checkpoint

    out = openmmlab.convert_to_openmmlab(tiny_mae_checkpoint, "mmseg", tmp_path / "vit_mmseg.pth", img_size=64)
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["arch"] == {"name": "mae_vit_tiny_patch16", "patch_size": 8}
    assert saved["state_dict"]["pos_embed"].shape == (1, 1 + 8 * 8, 192)  # resized to the 64 px grid
    assert not any(k.startswith(("decoder", "cls_token", "norm.")) for k in saved["state_dict"])
    from mimscale.downstream.openmmlab.modules import MimViT

    vit = MimViT(arch="mae_vit_tiny_patch16", patch_size=8, img_size=64, out_indices="quarters",
                 init_cfg=dict(type="Pretrained", checkpoint=str(out)))
    vit.init_weights()
    ref = load_checkpoint(tiny_mae_checkpoint)["model"]
    assert torch.equal(vit.vit.blocks[7].mlp.fc2.weight, ref["blocks.7.mlp.fc2.weight"])
    assert vit.vit.out_indices == [2, 5, 8, 11]
    with pytest.raises(ValueError, match="valid: mmdet, mmseg"):
        openmmlab.convert_to_openmmlab(tiny_mae_checkpoint, "mmpose", tmp_path / "x.pth")


@pytest.fixture
def kernel_calls(openmmlab, monkeypatch):
    """Counts calls of the plugin's torchvision kernels (the ones mmcv-lite runs on)."""
    from mimscale.downstream.openmmlab.torchvision_ops import SUPPLIED, TorchvisionKernels

    calls = dict.fromkeys(SUPPLIED, 0)

    def counting(name):
        real = getattr(TorchvisionKernels, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return staticmethod(counted)

    for name in SUPPLIED:
        monkeypatch.setattr(TorchvisionKernels, name, counting(name))
    return calls


def _tiny_vit(cfg, checkpoint, size):
    cfg.model.backbone.update(arch="mae_vit_tiny_patch16", patch_size=8, img_size=size,
                              init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint)))


def test_mask_rcnn_from_the_shipped_config_trains_on_generated_coco(openmmlab, tiny_mae_checkpoint,
                                                                   synthetic_coco, tmp_path, kernel_calls):
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    cfg = _load(openmmlab, "mask_rcnn_vit-b_1x_coco.py")
    size, ch = (64, 64), 32
    ckpt = openmmlab.convert_to_openmmlab(tiny_mae_checkpoint, "mmdet", tmp_path / "vit_mmdet.pth", img_size=64)
    _tiny_vit(cfg, ckpt, 64)
    cfg.model.backbone.update(window_size=4, global_blocks=[5, 11])
    # CPU-sized heads; the structure is the shipped one
    m = cfg.model
    m.data_preprocessor.batch_augments[0].size = size
    m.neck.update(in_channels=192, patch_size=8, out_channels=ch)
    m.rpn_head.update(in_channels=ch, feat_channels=ch)
    for key in ("bbox_roi_extractor", "mask_roi_extractor"):
        m.roi_head[key].out_channels = ch
    m.roi_head.bbox_head.update(in_channels=ch, conv_out_channels=ch, fc_out_channels=64, num_classes=len(CLASSES))
    m.roi_head.mask_head.update(in_channels=ch, conv_out_channels=ch, num_classes=len(CLASSES))
    m.train_cfg.rcnn.sampler.num = 64
    cfg.optim_wrapper.type = "OptimWrapper"  # AmpOptimWrapper needs a GPU
    ds_cfg = cfg.train_dataloader.dataset
    ds_cfg.update(data_root=f"{synthetic_coco}/", metainfo=dict(classes=CLASSES))
    ds_cfg.pipeline[2].scale = size
    ds_cfg.pipeline[3].crop_size = size
    ds_cfg.filter_cfg.min_size = 8

    init_default_scope("mmdet")
    from mmdet.registry import DATASETS, MODELS

    model = MODELS.build(cfg.model)
    model.init_weights()
    ow = build_optim_wrapper(model, cfg.optim_wrapper)
    lrs = sorted({round(g["lr"], 12) for g in ow.optimizer.param_groups})
    assert lrs[0] == pytest.approx(1e-4 * 0.7 ** 13) and lrs[-1] == pytest.approx(1e-4)
    dataset = DATASETS.build(ds_cfg)
    assert len(dataset) == 128
    data = pseudo_collate([dataset[i] for i in range(2)])
    model.train()
    before = model.backbone.vit.blocks[0].attn.qkv.weight.detach().clone()
    logs = model.train_step(data, ow)
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(logs)
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert not torch.equal(before, model.backbone.vit.blocks[0].attn.qkv.weight)
    model.eval()
    val_cfg = cfg.val_dataloader.dataset
    val_cfg.update(data_root=f"{synthetic_coco}/", metainfo=dict(classes=CLASSES))
    val_cfg.pipeline[1].scale = size
    out = model.val_step(pseudo_collate([DATASETS.build(val_cfg)[0]]))
    assert out[0].pred_instances.bboxes.shape[-1] == 4
    if openmmlab.TORCHVISION_OPS:  # CI: the declared extra, so the step ran on the plugin's kernels
        assert all(kernel_calls.values()), kernel_calls


def test_upernet_from_the_shipped_config_trains_on_generated_ade20k(openmmlab, tiny_mae_checkpoint,
                                                                   synthetic_ade, tmp_path):
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    cfg = _load(openmmlab, "upernet_vit-b_160k_ade20k.py")
    crop = (64, 64)
    ckpt = openmmlab.convert_to_openmmlab(tiny_mae_checkpoint, "mmseg", tmp_path / "vit_mmseg.pth", img_size=64)
    _tiny_vit(cfg, ckpt, 64)
    bn = dict(type="BN", requires_grad=True)  # SyncBN needs a process group
    m = cfg.model
    m.data_preprocessor.size = crop
    m.neck.update(in_channels=192, patch_size=8, norm="bn")
    m.decode_head.update(in_channels=[192] * 4, channels=32, norm_cfg=bn)
    m.auxiliary_head.update(in_channels=192, channels=16, norm_cfg=bn)
    m.test_cfg.update(crop_size=crop, stride=(48, 48))
    cfg.optim_wrapper.type = "OptimWrapper"
    ds_cfg = cfg.train_dataloader.dataset
    ds_cfg.data_root = str(synthetic_ade)
    ds_cfg.pipeline[2].scale = (128, 64)
    ds_cfg.pipeline[3].crop_size = crop

    init_default_scope("mmseg")
    from mmseg.registry import DATASETS, MODELS

    model = MODELS.build(cfg.model)
    model.init_weights()
    ow = build_optim_wrapper(model, cfg.optim_wrapper)
    dataset = DATASETS.build(ds_cfg)
    assert len(dataset) == 96
    data = pseudo_collate([dataset[i] for i in range(2)])
    labels = torch.cat([d.gt_sem_seg.data.flatten() for d in data["data_samples"]]).unique()
    assert set(labels.tolist()) <= set(range(7)) | {255}  # reduce_zero_label: background is class 0
    model.train()
    logs = model.train_step(data, ow)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(logs) and all(torch.isfinite(v).all() for v in logs.values())
    model.eval()
    val_cfg = cfg.val_dataloader.dataset
    val_cfg.data_root = str(synthetic_ade)
    val_cfg.pipeline[1].scale = (128, 64)
    out = model.val_step(pseudo_collate([DATASETS.build(val_cfg)[0]]))
    assert out[0].pred_sem_seg.data.shape == (1, 64, 64)  # slide inference on the shipped test_cfg


def test_convert_command_writes_the_mmdet_file(openmmlab, tiny_mae_checkpoint, tmp_path):
    out = tmp_path / "vit_mmdet.pth"
    assert main(["convert", str(tiny_mae_checkpoint), "--to", "mmdet", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["target"] == "mmdet" and saved["meta"]["img_size"] == 1024
    assert saved["state_dict"]["pos_embed"].shape == (1, 1 + 128 * 128, 192)  # 1024 px / patch 8
