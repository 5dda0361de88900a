"""FLOPs of one training step, counted from the config and the masking plan (no model is built).

Why analytic: the logger needs the count every run (TFLOP/s, MFU), the benchmarks and the study's
budget column need it for configs never run, and a profiler pass would cost a step of its own.

Convention, that of ``torch.utils.flop_counter.FlopCounterMode``: a matmul ``[m, k] @ [k, n]`` is
``2·m·n·k`` (linear layers, the patch convolution, attention's ``QKᵀ`` and ``AV``); norms, softmax,
GELU, elementwise scoring and the optimizer count nothing. A trainable pass's backward is 2× its
forward (input and weight gradients), except where an input needs no gradient: the patch embedding
(the image) and loss matmuls against detached keys compute one gradient (1×). No-grad passes
(scoring, teachers, ccMIM's masked set, the multi-shot guide's q, k) count their forward only.
With the score cache the scoring pass is amortised: one per image per refresh interval
(``refresh_interval``); warping the cached maps (RoIAlign) is not a matmul and counts nothing.

These are model FLOPs, the numerator of MFU: activation checkpointing's recompute is not counted,
nor the score recompute of a fused attention backward (which ``FlopCounterMode`` counts on CUDA:
2.5× forward for flash / efficient attention instead of 2×).

Ragged plans: AMR's per-image ratio ``r ± Δr`` (eq. 7) is counted at its expected centre
``masking.ratio``. Packed (``engine.varlen`` other than ``padded``, ``models.packed``) the encoder
executes each image's own visible set: ``packed_step_flops`` counts an observed batch's counts
(the mean of each image's own count, attention quadratic in it); padded, every image runs at the
batch's largest count, and the difference is padding, not model FLOPs.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mimscale.config import score_source
from mimscale.pretrain.masking.functional import num_visible
from mimscale.pretrain.models.factory import MODEL_SIZES
from mimscale.pretrain.models.mae import MaskedAutoencoderViT

MLP_RATIO = inspect.signature(MaskedAutoencoderViT.__init__).parameters["mlp_ratio"].default


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block(tokens: int, dim: int) -> int:
    """One pre-norm transformer block on ``tokens`` tokens: qkv, QKᵀ, AV, proj, MLP."""
    hidden = int(dim * MLP_RATIO)
    attention = 2 * 2 * tokens * tokens * dim  # QKᵀ and AV over all heads
    return linear(tokens, dim, 3 * dim) + attention + linear(tokens, dim, dim) + 2 * linear(tokens, dim, hidden)


def mlp_head(in_dim: int, hidden: int, out: int, layers: int) -> int:
    """``MLPHead`` on one row (a CLS vector)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out]
    return sum(linear(1, a, b) for a, b in zip(dims, dims[1:]))


@dataclass(frozen=True)
class ViT:
    """What the count needs of an encoder: width, depth, patch grid."""
    dim: int
    depth: int
    patch: int
    num_patches: int
    in_chans: int = 3

    @classmethod
    def named(cls, name: str, img_size: int, patch_size: int | None) -> ViT:
        size = MODEL_SIZES[name]
        patch = patch_size or size["patch_size"]
        return cls(size["embed_dim"], size["depth"], patch, (img_size // patch) ** 2)

    def embed(self) -> int:
        """The patch convolution over every patch (the encoder embeds all, then gathers)."""
        return linear(self.num_patches, self.in_chans * self.patch ** 2, self.dim)

    def qk(self, tokens: int) -> int:
        """A block's q, k read without running it (the qkv projection)."""
        return linear(tokens, self.dim, 3 * self.dim)

    def full(self, blocks: int) -> int:
        """Embedding + ``blocks`` blocks on the full image (CLS included)."""
        return self.embed() + blocks * block(1 + self.num_patches, self.dim)


@dataclass(frozen=True)
class Part:
    """FLOPs per image of one part of the step."""
    forward: float
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward


def trained(forward: float, embed: float = 0.0) -> Part:
    """A pass with gradient; ``embed`` is its patch-embedding share (weight gradient only)."""
    return Part(forward + embed, 2 * forward + embed)


@dataclass(frozen=True)
class StepFlops:
    """The breakdown of one optimizer step on one rank: ``parts`` per image, ``batch`` images per
    micro-step, ``accum`` micro-steps."""
    parts: dict[str, Part]
    batch: int
    accum: int = 1

    @property
    def per_image(self) -> float:
        return sum(p.total for p in self.parts.values())

    @property
    def per_step(self) -> float:
        return self.per_image * self.batch * self.accum

    def table(self) -> str:
        parts = [*self.parts.items(), ("total", Part(sum(p.forward for p in self.parts.values()),
                                                     sum(p.backward for p in self.parts.values())))]
        rows = [f"| {name} | {p.forward / 1e9:.4g} | {p.backward / 1e9:.4g} |" for name, p in parts]
        return "\n".join(["| part | forward GFLOP/image | backward GFLOP/image |", "| --- | --- | --- |", *rows,
                          f"{self.per_image / 1e9:.4g} GFLOP per image, {self.per_step / 1e12:.4g} TFLOP per step "
                          f"({self.batch} images x {self.accum} micro-steps)"])


def step_flops(cfg, visible: int | None = None, world_size: int = 1, img_size: int | None = None) -> StepFlops:
    """FLOPs of one training step of ``cfg`` (recipe + overrides), per image and per step, at
    ``img_size`` (default ``model.img_size``; a phase of ``schedule.resolution`` trains at another).

    ``visible``: the input mask's visible patches per image (default ``int(N·(1−ratio))``);
    ``world_size``: ranks whose keys the contrastive losses gather (their matmuls grow with it).
    """
    m = cfg.model
    size = img_size or m.img_size
    student = ViT.named(m.name, size, m.patch_size)
    n, dim = student.num_patches, student.dim
    k = num_visible(n, cfg.masking.ratio) if visible is None else visible
    parts: dict[str, Part] = {}

    widths, guides = _shot_widths(cfg, student, k)
    encoder = sum(b * block(1 + w, dim) for b, w in widths)
    parts["encoder"] = trained(encoder, student.embed())
    if guides:
        parts["shot_guides"] = Part(guides)
    dd = m.decoder_embed_dim
    decoder = (linear(1 + widths[-1][1], dim, dd) + m.decoder_depth * block(1 + n, dd)
               + linear(n, dd, student.patch ** 2 * student.in_chans))
    parts["decoder"] = trained(decoder)

    scoring = _scoring(cfg, student, _teacher(cfg, student, size))
    if scoring and cfg.masking.score_cache.every_epochs:
        parts["score_cache_refresh"] = Part(scoring / refresh_interval(cfg))
    elif scoring:
        parts["scoring"] = Part(scoring)
    parts.update(_objectives(cfg, student, k, widths[-1][1], cfg.data.batch_size * world_size))
    return StepFlops(parts, cfg.data.batch_size, cfg.optim.accum_steps)


def packed_step_flops(cfg, counts: Sequence[int], world_size: int = 1) -> StepFlops:
    """The step when each image of a batch runs its own visible count (packed AMR): per part, the
    mean over the images of :func:`step_flops` at that image's count."""
    if not counts:
        raise ValueError("packed_step_flops needs at least one image's visible count")
    tally = Counter(int(c) for c in counts)
    steps = {c: step_flops(cfg, c, world_size) for c in tally}
    first = next(iter(steps.values()))
    parts = {name: Part(sum(steps[c].parts[name].forward * w for c, w in tally.items()) / len(counts),
                        sum(steps[c].parts[name].backward * w for c, w in tally.items()) / len(counts))
             for name in first.parts}
    return StepFlops(parts, first.batch, first.accum)


def refresh_interval(cfg) -> float:
    """Epochs between two score-cache passes: ``every_epochs``, or the whole run for a frozen teacher
    (computed once). The pass scores each image once, so per trained image it costs one scoring pass
    over this interval (exact up to the samples the remainder drops or pads in each epoch)."""
    m = cfg.masking
    if score_source(m) == "teacher" and cfg.teacher.type == "frozen":
        return float(max(m.score_cache.every_epochs, cfg.schedule.epochs))
    return float(m.score_cache.every_epochs)


def _shot_widths(cfg, vit: ViT, k: int) -> tuple[list[tuple[int, int]], float]:
    """[(blocks, visible tokens)] through the encoder, and the no-grad FLOPs of guided shots
    (``masking.multishot.ShotPlan``: each keeps ``floor(K·(1−η))`` and may read a block's q, k)."""
    from mimscale.pretrain.masking.multishot import ShotPlan

    plan = ShotPlan(cfg.masking.shots, vit.depth)
    widths, guides, start = [], 0.0, 0
    for layer in sorted(plan.shots):
        ratio, guide = plan.shots[layer]
        widths.append((layer - start, k))
        if guide != "random":
            guides += vit.qk(1 + k) + (2 * k * vit.dim if guide == "cls" else 0)  # cls: q_CLS·k_patchᵀ
        k, start = math.floor(k * (1 - ratio)), layer
    widths.append((vit.depth - start, k))
    return widths, guides


def _teacher(cfg, student: ViT, img_size: int) -> ViT | None:
    t = cfg.teacher
    if t.type == "frozen":
        return ViT.named(t.model or cfg.model.name, img_size, cfg.model.patch_size)
    return student if t.type == "ema" else None


def _scoring(cfg, student: ViT, teacher: ViT | None) -> float:
    """The strategy's no-grad pass (``masking.strategies`` / ``masking.scoring``), forward only."""
    mk = cfg.masking
    vit = teacher if score_source(mk) == "teacher" else student
    n, tokens = vit.num_patches, 1 + vit.num_patches
    if mk.strategy == "idm":  # last block's q, k; q_CLS·kᵀ over all keys
        return vit.full(vit.depth - 1) + vit.qk(tokens) + 2 * tokens * vit.dim
    if mk.strategy == "gpa":  # q, k of the scoring block; the 'all' variant sums with one matmul
        index = mk.gpa.block % vit.depth  # the scoring network's own depth
        return vit.full(index) + vit.qk(tokens) + (2 * n * vit.dim if mk.gpa.queries == "all" else 0)
    if mk.strategy == "ccmim":
        if mk.ccmim.importance == "last":  # q_CLS·k_patchᵀ
            return vit.full(vit.depth - 1) + vit.qk(tokens) + 2 * n * vit.dim
        return vit.full(vit.depth) + vit.depth * (vit.qk(tokens) + 2 * tokens * vit.dim)
    if mk.strategy in ("sbam", "sbam_amr"):  # X·Xᵀ twice: the salience and its degenerate-range check
        return vit.embed() + 2 * (2 * n * n * vit.dim)
    return 0.0


def _objectives(cfg, student: ViT, k: int, latent: int, keys: int) -> dict[str, Part]:
    """Heads and losses beyond pixels (``method.MIMMethod._extra_terms``): ``k`` visible at the input,
    ``latent`` after the last shot, ``keys`` = the global batch."""
    o, n, dim, dd = cfg.objectives, student.num_patches, student.dim, cfg.model.decoder_embed_dim
    parts: dict[str, Part] = {}
    if o.mam.weight > 0:
        if o.mam.head == "linear":
            parts["mam"] = trained(linear(n, dd, 1))
        else:  # a second decoder, on every step (weighted 0 before mam.start)
            parts["mam"] = trained(linear(1 + latent, dim, dd) + cfg.model.decoder_depth * block(1 + n, dd)
                                   + linear(1 + n, dd, 1))
    if o.infonce.weight > 0:  # two views: the student's full encoder + projector + predictor ...
        c = o.infonce
        heads = mlp_head(dim, c.hidden, c.dim, 3) + mlp_head(c.dim, c.hidden, c.dim, 2)
        parts["contrast_views"] = trained(2 * (student.full(student.depth) - student.embed() + heads),
                                          2 * student.embed())
        parts["momentum_views"] = Part(2 * (student.full(student.depth) + mlp_head(dim, c.hidden, c.dim, 3)))
        loss = 2 * keys * c.dim  # q·keysᵀ per image, two directions; keys detached
        parts["contrast_loss"] = Part(2 * loss, 2 * loss)
    if o.ccmim.weight > 0:
        c = o.ccmim
        projector = mlp_head(dim, dim, c.dim, 2)
        parts["ccmim_masked"] = Part(student.embed() + student.depth * block(1 + n - k, dim) + projector)
        predictor = mlp_head(c.dim, dim, c.dim, 2) if c.variant == "align" else 0
        parts["ccmim_heads"] = trained(projector + predictor)
        pair = 2 * keys * c.dim
        if c.variant == "nce":  # v·vᵀ (both sides trained), m·vᵀ (m detached)
            parts["contrast_loss"] = Part(2 * pair, 3 * pair)
        elif c.variant == "code":
            parts["contrast_loss"] = Part(pair, pair)
    return parts


# --------------------------------------------------------------------------- peak

# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, TFLOP/s. First match of the
# device name wins. fp32 matmuls run on TF32 tensor cores only when torch's float32 matmul
# precision allows it (``torch.set_float32_matmul_precision``), else on the FP32 units.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),   # SXM
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),   # SXM (also GH200)
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops(device: torch.device | str, precision: str, override: float | None = None) -> float | None:
    """The device's dense peak for ``precision`` (bf16 | fp32), or ``override`` (``engine.peak_tflops``);
    None where unknown (CPUs, unlisted GPUs): MFU is then not reported."""
    if override is not None:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = precision
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        kind = "tf32"
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(kind)
    return None


@dataclass(frozen=True)
class Throughput:
    """Measured images/s -> per-device TFLOP/s and MFU, one formula for the training log and the
    benchmarks: ``step FLOPs × steps/s = FLOPs per image × images/s ÷ ranks``."""
    flops: StepFlops
    world_size: int = 1
    peak: float | None = None  # TFLOP/s of one device; None: MFU unknown

    def of(self, images_per_s: float) -> dict[str, float | None]:
        tflops = self.flops.per_image * images_per_s / self.world_size / 1e12
        return {"tflops_per_s": tflops, "mfu": tflops / self.peak if self.peak else None}
