"""Masking strategies = scorer + selector + ratio policy (SPEC §1–5), one class each.

A strategy gets a :class:`MaskingContext` (the batch, the networks it may score with, where
training stands, generators) and returns a :class:`MaskResult`. It never trains anything: every
score is computed without gradient and in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mimscale.config import ConfigError

from . import functional as F
from .scoring import block_qk, cls_attention_all_blocks, input_tokens
from .selectors import masked_counts, select


@dataclass
class MaskingContext:
    images: torch.Tensor
    grid: tuple[int, int]
    source: nn.Module | None          # the encoder the strategy scores with (student or teacher)
    epoch: int = 0
    progress_epoch: float = 0.0       # completed epochs / all epochs
    progress_step: float = 0.0        # step / all steps
    generator: torch.Generator | None = None         # per rank
    shared_generator: torch.Generator | None = None  # identical on every rank
    cached: torch.Tensor | None = None  # [B, C, N] score maps warped from the score cache, else None

    @property
    def batch(self) -> int:
        return self.images.shape[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class MaskResult:
    mask: torch.Tensor                   # [B, N] bool, True = hidden
    score: torch.Tensor | None = None    # [B, N] what the selector ranked or sampled from
    logs: dict | None = None             # scalars worth logging (ratios, entropy, heads, ...)
    visible: int | None = None           # patches every image keeps, when known on the host


class Strategy(nn.Module):
    """Base: a fixed-ratio strategy whose selector may be overridden from the config."""

    default_selector = "random"
    default_width = 0.5

    def __init__(self, cfg):
        super().__init__()
        self.ratio = cfg.ratio
        self.selector = self.default_selector if cfg.selector == "auto" else cfg.selector
        self.width = cfg.noise_width if cfg.noise_width is not None else self.default_width

    def scores(self, ctx: MaskingContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(score for topk-like selectors, probabilities for ``sample``); None if not needed."""
        return None, None

    def forward(self, ctx: MaskingContext) -> MaskResult:
        counts = masked_counts(ctx.num_patches, self.ratio, ctx.batch, ctx.images.device)
        score, probs = self.scores(ctx)
        ranked = probs if self.selector == "sample" else score
        if ranked is None and self.selector in ("topk", "sample", "noisy_topk"):
            raise ValueError(f"selector {self.selector!r} needs a score; strategy {type(self).__name__} has none")
        mask = select(self.selector, ranked, counts, ctx.generator, grid=ctx.grid, width=self.width,
                      batch=ctx.batch, device=ctx.images.device)
        return MaskResult(mask, score, visible=self.visible(ctx))

    def visible(self, ctx: MaskingContext) -> int | None:
        """Every selector hides exactly ``counts``: with a fixed ratio the encoder needs no host read."""
        return None if isinstance(self.ratio, torch.Tensor) else F.num_visible(ctx.num_patches, self.ratio)

    def observe(self, loss_per_image: torch.Tensor) -> None:
        """Per-image reconstruction losses of the step this strategy masked (PLB uses them)."""


def _maps(strategy, ctx: MaskingContext) -> torch.Tensor:
    """The strategy's ``[B, C, N]`` score maps: the score cache's, warped into this view, or scored now."""
    return ctx.cached if ctx.cached is not None else strategy.score_maps(ctx.source, ctx.images)


class RandomStrategy(Strategy):
    """MAE: a uniformly random subset."""


class BlockStrategy(Strategy):
    """BEiT: rectangular blocks."""

    default_selector = "block"


class CCMIMStrategy(Strategy):
    """ccMIM (SPEC §4): importance sampling of the CLS-attention importance (eq. 4)."""

    default_selector = "sample"
    default_width = 1.0

    def __init__(self, cfg):
        super().__init__(cfg)
        self.importance = cfg.ccmim.importance

    def score_maps(self, source, images) -> torch.Tensor:
        """``[B, 1, N]``: the importance (``last``) or the summed CLS rows (``all_blocks``)."""
        if self.importance == "last":
            q, k = block_qk(source, images, -1)
            return F.cls_importance(q, k).unsqueeze(1)
        return cls_attention_all_blocks(source, images).float().unsqueeze(1)

    def scores(self, ctx):
        s = _maps(self, ctx)[:, 0]
        if self.importance == "last":
            if ctx.cached is not None:  # a warped map no longer sums to 1
                s = s / s.sum(-1, keepdim=True)
            return s.clamp_min(1e-30).log(), s  # log s ranks as s; noisy_topk(1) of log s: the code's rule
        return s.log_softmax(dim=-1), s / s.sum(-1, keepdim=True)


class IDMStrategy(Strategy):
    """IDM + PLB (SPEC §2): hide the top of one last-block CLS attention head; heads drawn from P.

    PLB state (P, and this epoch's per-head loss sums and counts) lives in ``extra_state`` rather
    than buffers so that DDP's buffer broadcast never overwrites a rank's own sums.
    """

    default_selector = "topk"

    def __init__(self, cfg, num_heads: int):
        super().__init__(cfg)
        c = cfg.idm
        self.plb, self.scope, self.lam, self.eps = c.plb, c.plb_scope, c.plb_lambda, c.plb_eps
        self.num_heads = num_heads
        self.p = torch.full((num_heads,), 1.0 / num_heads, dtype=torch.float64)
        self.loss_sum = torch.zeros(num_heads, dtype=torch.float64)
        self.loss_count = torch.zeros(num_heads, dtype=torch.float64)
        self.head_mean = torch.full((num_heads,), float("nan"), dtype=torch.float64)
        self.epoch = 0
        self._heads: torch.Tensor | None = None

    def draw_heads(self, ctx: MaskingContext) -> torch.Tensor:
        """``[B]`` head indices: one shared draw per step (same generator on every rank) or one per image."""
        p = self.p.float()
        if self.scope == "step":
            head = torch.multinomial(p, 1, generator=ctx.shared_generator)
            return F.to_device(head, ctx.images.device).expand(ctx.batch)
        return F.to_device(torch.multinomial(p, ctx.batch, replacement=True, generator=ctx.generator), ctx.images.device)

    def scores(self, ctx):
        if ctx.epoch > self.epoch:
            self.end_epoch(ctx.epoch)
        a = _maps(self, ctx)                                 # [B, h, N]
        heads = self.draw_heads(ctx)
        self._heads = heads
        score = a.gather(1, heads.view(-1, 1, 1).expand(-1, 1, a.shape[-1])).squeeze(1)
        return score, score / score.sum(-1, keepdim=True)

    def score_maps(self, source, images) -> torch.Tensor:
        """``[B, h, N]``: every head's last-block CLS attention (PLB picks the head per step)."""
        q, k = block_qk(source, images, -1)
        return F.cls_patch_attention(q, k)

    def forward(self, ctx):
        result = super().forward(ctx)
        result.logs = {f"plb_p_{i}": v for i, v in enumerate(self.p.float().unbind())}
        return result

    @torch.no_grad()
    def observe(self, loss_per_image: torch.Tensor) -> None:
        if not self.plb or self._heads is None:
            return
        device = loss_per_image.device
        if self.loss_sum.device != device:  # accumulate where the losses are: no host sync per step
            self.loss_sum, self.loss_count = self.loss_sum.to(device), self.loss_count.to(device)
        self.loss_sum.index_add_(0, self._heads, loss_per_image.detach().double())
        self.loss_count.index_add_(0, self._heads, torch.ones_like(self._heads, dtype=torch.float64))
        self._heads = None

    @torch.no_grad()
    def end_epoch(self, new_epoch: int) -> None:
        """Eq. 4 over the epoch's all-reduced per-head mean losses; identical on every rank."""
        if self.plb:
            sums = torch.stack([self.loss_sum, self.loss_count])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums)
            total, count = sums.cpu()
            if count.sum() > 0:
                fallback = self.head_mean.nan_to_num(float(total.sum() / count.sum()))
                means = torch.where(count > 0, total / count.clamp_min(1), fallback)
                self.head_mean = means
                self.p = F.plb_update(self.p, means, self.lam, self.eps).double()
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.epoch = new_epoch

    def get_extra_state(self):
        return {"p": self.p, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "head_mean": self.head_mean, "epoch": self.epoch}

    def set_extra_state(self, state):
        self.p, self.loss_sum, self.loss_count = state["p"], state["loss_sum"], state["loss_count"]
        self.head_mean, self.epoch = state["head_mean"], int(state["epoch"])


class GPAStrategy(Strategy):
    """GPA (SPEC §3): soft-to-hard masking from one teacher head's global patch-wise attention."""

    default_selector = "topk"

    def __init__(self, cfg, num_heads: int):
        super().__init__(cfg)
        c = cfg.gpa
        if c.head != "mean" and not 0 <= c.head < num_heads:
            raise ConfigError(f"masking.gpa.head={c.head} but the scoring network has {num_heads} heads; "
                             "pick one with `mimscale select-head` or use masking.gpa.head=mean")
        self.c = c

    def score_maps(self, source, images) -> torch.Tensor:
        """``[B, 1, N]``: the chosen head's GPA (or the sum over heads)."""
        q, k = block_qk(source, images, self.c.block)
        g = F.global_patch_attention(q, k, self.c.queries)  # [B, h, N]
        return g.sum(dim=1, keepdim=True) if self.c.head == "mean" else g[:, self.c.head:self.c.head + 1]

    def gpa(self, ctx) -> torch.Tensor:
        return _maps(self, ctx)[:, 0]

    def forward(self, ctx):
        if self.selector != "topk":  # a plain selector over the GPA score (ablations)
            return super().forward(ctx)
        g = self.gpa(ctx)
        progress = ctx.progress_epoch if self.c.progress == "epoch" else ctx.progress_step
        a_s, a_h, _ = F.soft_to_hard_fractions(progress, self.c.soft, self.c.hard)
        n = masked_counts(ctx.num_patches, self.ratio, ctx.batch, g.device)
        n_h = torch.floor(a_h * n.double()).long()
        n_s = torch.minimum(torch.floor(a_s * n.double()).long(), n - n_h)
        hard = select("topk", g, n_h)
        probs = _soft_probs(g, self.c.soft_probs)
        keys = F.gumbel_keys(probs, ctx.generator)
        ties = F.to_device(torch.rand(probs.shape, generator=ctx.generator), g.device)
        keys = torch.where(probs > 0, keys, -1e30 + ties)
        soft = select("topk", keys.masked_fill(hard, float("-inf")), n_s)
        rest = F.to_device(torch.rand(g.shape, generator=ctx.generator), g.device).masked_fill(hard | soft, float("-inf"))
        rand = select("topk", rest, n - n_h - n_s)
        logs = {"gpa_alpha_soft": torch.tensor(a_s), "gpa_alpha_hard": torch.tensor(a_h)}
        return MaskResult(hard | soft | rand, g, logs, visible=self.visible(ctx))

    def scores(self, ctx):
        g = self.gpa(ctx)
        return g, _soft_probs(g, self.c.soft_probs)


def _soft_probs(g: torch.Tensor, kind: str) -> torch.Tensor:
    """π for GPA's soft part: per-image min–max normalised GPA [C], or softmax of its z-score [S]."""
    if kind == "minmax":
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        return (g - lo) / (hi - lo).clamp_min(1e-12)
    z = (g - g.mean(-1, keepdim=True)) / g.std(-1, keepdim=True).clamp_min(1e-12)
    return z.softmax(-1)


class SBAMStrategy(Strategy):
    """SBAM (SPEC §5): noisy top-k of input-token salience; with AMR, a per-image ratio (eq. 7)."""

    default_selector = "noisy_topk"
    default_width = 0.5

    def __init__(self, cfg, amr: bool):
        super().__init__(cfg)
        self.c, self.amr = cfg.sbam, amr

    def forward(self, ctx):
        with torch.no_grad():
            x = input_tokens(ctx.source, ctx.images).float()
        scale = x.shape[-1] ** -0.5 if self.c.scaled else None
        s = F.token_salience(x, scale)
        flat = F.salience_range(x, scale) < 1e-6                # degenerate: fall back to random
        if ctx.epoch < self.c.random_warmup_epochs:
            flat = torch.ones_like(flat)
        ratio = torch.full((ctx.batch,), self.ratio, device=s.device)
        if self.amr:
            r = F.adaptive_mask_ratio(s, self.ratio, self.c.delta_r, self.c.threshold)
            if self.c.amr_scope == "local_batch":  # one ratio: the mean over the rank's usable images
                ok = (~flat).float()
                mean = (r * ok).sum() / ok.sum().clamp_min(1)
                r = torch.where(ok.sum() > 0, mean, torch.tensor(self.ratio, device=r.device)).expand_as(r)
            ratio = torch.where(flat, ratio, r)
        counts = masked_counts(ctx.num_patches, ratio, ctx.batch, s.device)
        ranked = s / s.sum(-1, keepdim=True).clamp_min(1e-12) if self.selector == "sample" else s
        guided = select(self.selector, ranked, counts, ctx.generator, grid=ctx.grid, width=self.width,
                        batch=ctx.batch, device=s.device)
        fallback = select("random", None, counts, ctx.generator, grid=ctx.grid, batch=ctx.batch, device=s.device)
        guided = torch.where(flat[:, None], fallback, guided)
        dist_s = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(dist_s * (dist_s + 1e-12).log()).sum(-1)
        logs = {"mask_ratio": ratio.mean(), "salience_entropy": entropy.mean(),
                "salience_fallback": flat.float().mean()}
        # without AMR every image (fallback included) keeps the fixed count: no host read downstream
        return MaskResult(guided, s, logs, visible=None if self.amr else self.visible(ctx))


def build_strategy(cfg, num_heads: int) -> Strategy:
    """The strategy a ``masking`` config names; ``num_heads`` is the scoring network's."""
    name = cfg.strategy
    if name == "random":
        return RandomStrategy(cfg)
    if name == "block":
        return BlockStrategy(cfg)
    if name == "idm":
        return IDMStrategy(cfg, num_heads)
    if name == "gpa":
        return GPAStrategy(cfg, num_heads)
    if name == "ccmim":
        return CCMIMStrategy(cfg)
    if name in ("sbam", "sbam_amr"):
        return SBAMStrategy(cfg, amr=name == "sbam_amr")
    raise ValueError(f"unknown masking strategy {name!r}")
