"""EMA teacher: the momentum ramp and the update formula."""

import math

import pytest
import torch

from mimscale.pretrain.teacher import ema_momentum, ema_update_


def test_momentum_ramp_values():
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(100, 100) == pytest.approx(1.0)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    for s in (0, 13, 77, 100, 150):
        p = min(1.0, s / 100)
        want = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * p) + 1) / 2
        assert ema_momentum(s, 100, base=0.99) == pytest.approx(want)
    values = [ema_momentum(s, 100) for s in range(101)]
    assert values == sorted(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_update_equals_formula(dtype):
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]
    student = [torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]
    m = 0.9
    want = [m * t.float() + (1 - m) * s.float() for t, s in zip(teacher, student)]
    ema_update_(teacher, student, m)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for t, w in zip(teacher, want):
        torch.testing.assert_close(t.float(), w, rtol=tol, atol=tol)


def test_momentum_one_freezes_teacher():
    teacher, student = [torch.ones(4)], [torch.zeros(4)]
    ema_update_(teacher, student, 1.0)
    assert torch.equal(teacher[0], torch.ones(4))
    with pytest.raises(ValueError):
        ema_update_(teacher, [], 0.5)


@pytest.mark.parametrize("block", [-2, -1, 9])
def test_a_truncated_teacher_scores_the_block_the_config_names(tiny_config, tmp_path, block):
    """The teacher keeps the blocks up to its scoring block; a negative block still counts from the
    end of the whole network (block -2 of 12 is block 10, not block 9 of the 11 kept)."""
    from mimscale.pretrain.masking.scoring import block_qk
    from mimscale.pretrain.method import MIMMethod
    from mimscale.pretrain.teacher import frozen_teacher

    cfg = tiny_config("recipe=gpa", "teacher.type=ema", f"masking.gpa.block={block}", "masking.gpa.head=0")
    method = MIMMethod(cfg)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = block_qk(method.student, images, block)  # the EMA teacher starts as the student's copy
    assert len(method.teacher.blocks) == block % 12 + 1
    torch.testing.assert_close(block_qk(method.teacher, images, block), want)

    path = tmp_path / "student.pth"
    torch.save({"model": method.student.state_dict()}, path)
    frozen = frozen_teacher(str(path), "mae_vit_tiny_patch16", 32, 8, lambda full: block % full + 1)
    assert len(frozen.blocks) == block % 12 + 1 and frozen.full_depth == 12
    torch.testing.assert_close(block_qk(frozen, images, block), want)


def test_ema_gated_on_the_device_follows_only_applied_steps():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    student = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 0.9, applied=torch.tensor(False))
    assert all(torch.equal(t, b) for t, b in zip(teacher, before))  # a skipped step: bit-identical
    ema_update_(teacher, student, 0.9, applied=torch.tensor(True))
    for t, b, s in zip(teacher, before, student):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=1e-6, atol=1e-6)
