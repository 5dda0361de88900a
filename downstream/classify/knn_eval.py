"""``mimscale knn``: weighted k-NN accuracy of a frozen encoder's features (DINO's protocol: CLS
token after the final norm, L2-normalised, k = 20, T = 0.07).

Each rank embeds its share of the training split into its own bank shard and never sees the
others'; the evaluation features (smaller) are shared, and each chunk of queries merges the ranks'
top-k candidates (``knn.knn_scores``).
"""

from __future__ import annotations

from .common import progress_bar, report, start
from .config import KNNRunConfig
from .data import eval_transform, load_splits
from .engine import topk_correct
from .features import extract, gather_rows, shard_indices
from .knn import knn_scores
from .model import build_vit, load_weights
from .subsets import training_subset


def run_knn(cfg: KNNRunConfig) -> dict:
    run = start(cfg)
    d, env = cfg.data, run.env
    train, eval_set = load_splits(d, True, env.is_main, run.backend.barrier)
    train = training_subset(train, d.subset, d.subset_file, d.subset_seed,
                            run.run_dir / "subset.txt" if env.is_main else None)
    encoder = build_vit(run.model, run.patch_size, run.img_size, 0, cfg.model.pool, fc_norm=False)
    if run.weights is not None:
        load_weights(encoder, run.weights)
    encoder = encoder.to(run.backend.device)
    train.transform = eval_set.transform = eval_transform(run.img_size, d.crop_pct)

    def embed(dataset, label):
        mine = shard_indices(len(dataset), env.rank, env.world_size)
        with progress_bar(run, len(mine), f"knn: {label}", cfg.output.progress) as bar:
            return extract(encoder, dataset, mine, d.batch_size, run.backend.device, run.backend.autocast,
                           d.num_workers, normalize=True, progress=bar)

    bank, bank_labels = embed(train, "bank")
    queries, labels = embed(eval_set, "queries")
    queries, labels = gather_rows(queries, len(eval_set)), gather_rows(labels, len(eval_set))
    k = cfg.knn
    scores = knn_scores(queries, bank, bank_labels, eval_set.num_classes, k.k, k.temperature, k.chunk,
                        distributed=True)
    top1, top5 = (100 * c / max(len(labels), 1) for c in topk_correct(scores, labels).tolist())
    metrics = {"top1": top1, "top5": top5, "n": len(labels)}
    extra = {"subset_size": len(train)} if d.subset or d.subset_file else {}
    report(run, cfg, "knn", metrics, None, k=k.k, temperature=k.temperature, bank_size=len(train), **extra)
    run.backend.barrier()
    return metrics
