"""No reader unpickles code: a .pth whose pickle runs a shell command is refused everywhere (the
command never runs), while official MAE files, which pickle their argparse args, still load."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings

import pytest
import torch

from mimscale.downstream.classify.weights import read_weights as classify_weights
from mimscale.downstream.dense.weights import read_encoder_weights
from mimscale.errors import CheckpointError
from mimscale.pretrain.engine.checkpoint import load_checkpoint, write_checkpoint
from mimscale.pretrain.engine.zero import TAG, vet_deepspeed_files
from mimscale.pretrain.models import build_mae, load_mae_checkpoint, to_timm_state_dict
from mimscale.pretrain.teacher import frozen_teacher
from mimscale.tools.analysis.encoders import read_weights as analysis_weights

TINY = dict(img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system: what a malicious checkpoint does
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return build_mae("mae_vit_tiny_patch16", **TINY)


@pytest.fixture
def evil(tmp_path, mae):
    """(an MAE-looking .pth that runs ``touch MARKER`` when fully unpickled, the marker's path)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae.state_dict(), "args": _RunsACommand(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is real: full unpickling runs the command
    assert marker.exists()
    marker.unlink()
    return path, marker


READERS = {
    "analysis": analysis_weights,
    "classify": classify_weights,
    "dense": read_encoder_weights,
    "load_mae_checkpoint": lambda p: load_mae_checkpoint(build_mae("mae_vit_tiny_patch16", **TINY), p),
    "teacher.checkpoint": lambda p: frozen_teacher(str(p), "mae_vit_tiny_patch16", 32, 8, 2),
    "load_checkpoint": load_checkpoint,
}
REFUSED = r"holds Python objects that are not allowed to be loaded \(posix.system\): refusing to unpickle it"


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_a_pickle_that_runs_code(reader, evil, tmp_path):
    path, marker = evil
    if reader == "load_checkpoint":  # the same payload inside a mimscale checkpoint's state.pt
        path = write_checkpoint(tmp_path / "step_00000001", {"step": 1, "model": {}, "x": _RunsACommand(marker)})
    with pytest.raises(CheckpointError, match=f"{path.name}.* {REFUSED}, since loading it could run code; if you trust the file"):
        READERS[reader](path)
    assert not marker.exists()


def test_deepspeed_files_are_vetted_before_deepspeed_unpickles_them(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / TAG).mkdir()
    torch.save({"module": {}, "ds_version": "0"}, tmp_path / TAG / "mp_rank_00_model_states.pt")
    vet_deepspeed_files(tmp_path)  # plain contents pass
    torch.save({"optimizer_state_dict": _RunsACommand(marker)}, tmp_path / TAG / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(CheckpointError, match=f"zero_pp_rank_0_optim_states.pt {REFUSED}"):
        vet_deepspeed_files(tmp_path)
    assert not marker.exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mimscale", *args], capture_output=True, text=True, timeout=300)


def test_the_commands_refuse_it_without_running_it(evil, tmp_path):
    path, marker = evil
    for args in (["analyze", "attention", str(path), "--out", str(tmp_path / "att")],
                 ["knn", f"checkpoint={path}", "data.dataset=synthetic", f"output.dir={tmp_path / 'knn'}"]):
        done = _cli(*args)
        assert done.returncode != 0 and "not allowed to be loaded (posix.system)" in done.stderr, done.stderr[-2000:]
        assert not marker.exists()


def test_official_mae_files_still_load_everywhere_with_their_mask_ratio(tmp_path, mae):
    path = tmp_path / "mae_pretrain_full.pth"
    args = argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75, norm_pix_loss=True, input_size=32)
    torch.save({"model": mae.state_dict(), "args": args, "epoch": 799}, path)
    want = mae.state_dict()["blocks.1.attn.qkv.weight"]
    assert classify_weights(path).mask_ratio == 0.75
    for reader in ("analysis", "classify", "dense", "teacher.checkpoint"):
        got = READERS[reader](path)
        state = got[0] if isinstance(got, tuple) else getattr(got, "state", None) or got.state_dict()
        assert torch.equal(state["blocks.1.attn.qkv.weight"], want), reader
    fresh = build_mae("mae_vit_tiny_patch16", **TINY)
    assert not load_mae_checkpoint(fresh, path).encoder_only
    assert torch.equal(fresh.decoder_embed.weight, mae.decoder_embed.weight)
    torch.save({"model": to_timm_state_dict(mae)}, tmp_path / "mae_pretrain_vit_tiny.pth")  # encoder only
    assert load_mae_checkpoint(fresh, tmp_path / "mae_pretrain_vit_tiny.pth").encoder_only


def _dcp_folder(path, extra=None):
    """A real torch.distributed.checkpoint folder (one process): tensors plus non-tensor items."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.randn(3, 4)}, "optimizer": {"param_groups": [{"lr": 0.1, "params": ["w"]}]},
             "step": 7, **(extra or {})}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


def test_sharded_checkpoints_are_vetted_before_torch_unpickles_them(tmp_path):
    """torch reads a DCP folder's .metadata with plain pickle and its non-tensor items with
    torch.load(weights_only=False): both are checked with the safe loaders first."""
    import pickle

    from mimscale.pretrain.engine.fsdp import read_dcp
    from mimscale.pretrain.engine.safe_load import vet_dcp

    vet_dcp(_dcp_folder(tmp_path / "good"))  # a real one passes

    marker = tmp_path / "MARKER"
    bad_item = _dcp_folder(tmp_path / "bad_item", {"args": _RunsACommand(marker)})  # stored as bytes
    with pytest.raises(CheckpointError, match=REFUSED):
        vet_dcp(bad_item)

    bad_meta = _dcp_folder(tmp_path / "bad_meta")
    (bad_meta / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(CheckpointError, match=REFUSED):
        vet_dcp(bad_meta)
    (bad_meta / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        vet_dcp(bad_meta)

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"  # what convert / resume read
    write_checkpoint(ckpt, {"step": 1, "format": "dcp"})
    _dcp_folder(ckpt / "dcp", {"args": _RunsACommand(marker)})
    with pytest.raises(CheckpointError, match=REFUSED):
        read_dcp(ckpt)
    with pytest.raises(CheckpointError, match=REFUSED):
        load_checkpoint(tmp_path / "run")
    assert not marker.exists()
