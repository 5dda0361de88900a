# Mask R-CNN 1x on COCO with a mimscale-pretrained ViT-L/16 (ViTDet's ViT-L settings: global attention
# in blocks 5, 11, 17, 23, layer decay 0.8, drop path 0.4); everything else as the ViT-B config.
#
#   mimscale convert runs/<run>/checkpoints/step_XXXXXXXX --to mmdet --out checkpoints/mimscale_vit-l_mmdet.pth
_base_ = './mask_rcnn_vit-b_1x_coco.py'

pretrained = 'checkpoints/mimscale_vit-l_mmdet.pth'
embed_dim = 1024
depth = 24

model = dict(
    backbone=dict(arch='mae_vit_large_patch16', drop_path_rate=0.4, global_blocks=[5, 11, 17, 23],
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=embed_dim))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=depth, layer_decay_rate=0.8))
