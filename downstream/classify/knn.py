"""Weighted k-NN classification (DINO's protocol): cosine similarity to a bank of training
features, the k nearest vote with weight ``exp(sim / T)``.

Why chunks: the similarity of every query to every bank entry never exists at once; a chunk of
queries meets the whole bank (``bank.T`` is a view, not a copy), keeps its top k, and is done. Under
data parallelism each rank holds only its shard of the bank, and the ranks' top-k candidates are
merged, so the bank is never gathered or held twice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def nearest(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities ``[Q, k']`` and the neighbours' labels (``k' = min(k, N)``).
    ``queries [Q, D]`` and ``bank [N, D]`` must be L2-normalised."""
    sims = queries @ bank.T
    top, idx = sims.topk(min(k, bank.shape[0]), dim=1)
    return top, bank_labels[idx]


def merge(candidates: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The overall top ``k`` of several shards' candidates (each ``[Q, k_i]``)."""
    sims = torch.cat([s for s, _ in candidates], dim=1)
    labels = torch.cat([y for _, y in candidates], dim=1)
    top, pos = sims.topk(min(k, sims.shape[1]), dim=1)
    return top, labels.gather(1, pos)


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class scores ``[Q, C]``: each neighbour adds ``exp(sim / T)`` to its class."""
    weights = (sims.float() / temperature).exp()
    return torch.zeros(sims.shape[0], num_classes, device=sims.device).scatter_add_(1, labels, weights)


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024, distributed: bool = False
               ) -> torch.Tensor:
    """Class scores of every query, ``chunk`` queries at a time. With ``distributed``, ``bank`` is
    this rank's shard, every rank passes the same queries, and every rank gets the same scores."""
    if k < 1 or temperature <= 0 or chunk < 1:
        raise ValueError(f"knn: k {k} and chunk {chunk} must be >= 1 and temperature {temperature} > 0")
    world = dist.get_world_size() if distributed and dist.is_initialized() else 1
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims, labels = nearest(queries[start:start + chunk], bank, bank_labels, k)
        if world > 1:
            sims, labels = merge(_gather_candidates(sims, labels, k, world), k)
        out.append(vote(sims, labels, num_classes, temperature))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def _gather_candidates(sims, labels, k: int, world: int):
    """Every rank's candidates; shards smaller than ``k`` are padded with impossible ones."""
    pad = k - sims.shape[1]
    if pad:
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), -float("inf"))], dim=1)
        labels = torch.cat([labels, labels.new_zeros(labels.shape[0], pad)], dim=1)
    all_sims = [torch.empty_like(sims) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_sims, sims.contiguous())
    dist.all_gather(all_labels, labels.contiguous())
    return list(zip(all_sims, all_labels))
