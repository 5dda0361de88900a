"""Packed ragged batches: the tokens of every image in one ``[T, D]`` tensor, no padding.

Why: AMR gives each image its own visible count and a later shot drops tokens per image; padding the
batch to its largest set makes every linear layer and MLP of the encoder run on slots that carry
nothing. Packed, the token-wise work runs on exactly ``T = Σ_b L_b`` rows and attention runs per
image (varlen), with the image boundaries taken from :class:`Segments`.

Attention kernels (``engine.varlen``): ``nested`` (SDPA on a nested jagged tensor; varlen flash /
efficient kernels on CUDA), ``flex`` (FlexAttention with a block mask of the image structure;
compiled on CUDA; the CPU has no backward for it, so training on a CPU cannot use it), ``masked``
(q, k, v scattered into ``[B, width]`` slots for one batched SDPA with a key mask, the outputs
gathered back: only attention sees the padding; on a CPU torch runs nested SDPA image by image,
which measured slower than padding the whole model). ``auto`` picks ``nested`` on CUDA (to be
measured against ``flex`` on GPUs) and ``masked`` on a CPU. When every image keeps the same count
the packed rows are reshaped to ``[B, L, D]`` and the ordinary batched kernel runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

VARLEN = ("auto", "nested", "flex", "masked", "padded")


def resolve_varlen(mode: str, device: torch.device) -> str:
    """``auto`` -> ``nested`` on CUDA, ``masked`` elsewhere (on a CPU torch runs nested SDPA image
    by image); an unknown name is an error."""
    if mode not in VARLEN:
        raise ValueError(f"varlen must be one of {', '.join(VARLEN)}, got {mode!r}")
    if mode == "auto":
        return "nested" if torch.device(device).type == "cuda" else "masked"
    return mode


@dataclass
class Segments:
    """Image boundaries of a packed tensor. ``lengths`` (host ints) fix the shapes without a host
    read; ``doc [T]`` is each row's image and ``local [T]`` its slot within the image (device)."""

    lengths: list[int]
    offsets: torch.Tensor
    doc: torch.Tensor
    local: torch.Tensor
    kernel: str = "nested"

    @classmethod
    def of(cls, lengths: list[int], dev_lengths: torch.Tensor, kernel: str = "nested") -> Segments:
        """``lengths`` on the host and the same values on the device (built there: no copy)."""
        total = sum(lengths)
        dev_lengths = dev_lengths.long()
        offsets = torch.cat([dev_lengths.new_zeros(1), dev_lengths.cumsum(0)])
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev_lengths.device), dev_lengths,
                                      output_size=total)
        local = torch.arange(total, device=dev_lengths.device) - offsets[doc]
        return cls(list(lengths), offsets, doc, local, kernel)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths) if self.lengths else 0

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots [B, W]`` (W ≥ each length) -> ``[T]``: row ``t`` takes ``slots[doc_t, local_t]``."""
        return slots[self.doc, self.local]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``[T, D]`` -> ``[B, width, D]``, zeros past each image's length (differentiable)."""
        out = x.new_zeros(len(self.lengths), self.width, x.shape[-1])
        return out.index_put((self.doc, self.local), x)

    @functools.cached_property
    def key_mask(self) -> torch.Tensor:
        """``[B, 1, 1, width]``: the slots holding a row of the image (slot 0 also for an image
        without rows, so that its ignored query rows see a key and stay finite)."""
        lengths = (self.offsets[1:] - self.offsets[:-1]).clamp(min=1)
        return (torch.arange(self.width, device=lengths.device) < lengths[:, None])[:, None, None, :]

    @functools.cached_property
    def block_mask(self):
        """FlexAttention block mask: a row attends to the rows of its own image only."""
        from torch.nn.attention.flex_attention import create_block_mask

        doc = self.doc

        def same_image(b, h, q, kv):
            return doc[q] == doc[kv]

        return create_block_mask(same_image, None, None, self.total, self.total, device=doc.device)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _flex_compiled():
    return torch.compile(_flex(), dynamic=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Per-image attention of packed ``q, k, v [T, h, d]`` -> ``[T, h, d]``."""
    T, h, d = q.shape
    if seg.uniform:
        B = len(seg.lengths)
        q, k, v = (t.reshape(B, T // max(B, 1), h, d).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, h, d)
    if seg.kernel == "masked":
        q, k, v = (seg.pad(t.reshape(T, h * d)).unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.key_mask)
        return out.transpose(1, 2)[seg.doc, seg.local]
    if seg.kernel == "flex":
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        fn = _flex_compiled() if q.device.type == "cuda" else _flex()
        return fn(q, k, v, block_mask=seg.block_mask)[0].transpose(0, 1)
    lo, hi = min(seg.lengths), max(seg.lengths)
    q, k, v = (torch.nested.nested_tensor_from_jagged(t.contiguous(), seg.offsets, min_seqlen=lo, max_seqlen=hi)
               .transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()


def drop_path(x: torch.Tensor, prob: float, seg: Segments, training: bool) -> torch.Tensor:
    """Stochastic depth per image of a packed tensor (timm's ``DropPath`` would drop per row)."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty(len(seg.lengths)).bernoulli_(1 - prob) / (1 - prob)
    return x * keep[seg.doc, None]
