# UperNet 160k on ADE20K with a mimscale-pretrained ViT-L/16 (MAE's ViT-L settings: layer decay 0.75,
# drop path 0.2, features from blocks 6, 12, 18, 24, decode width 1024); everything else as ViT-B.
#
#   mimscale convert runs/<run>/checkpoints/step_XXXXXXXX --to mmseg --out checkpoints/mimscale_vit-l_mmseg.pth
_base_ = './upernet_vit-b_160k_ade20k.py'

pretrained = 'checkpoints/mimscale_vit-l_mmseg.pth'
embed_dim = 1024
depth = 24

model = dict(
    backbone=dict(arch='mae_vit_large_patch16', drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=embed_dim),
    auxiliary_head=dict(in_channels=embed_dim))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=depth, layer_decay_rate=0.75))
