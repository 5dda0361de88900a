"""``mimscale shards write|index``: make webdataset shards or an FFCV .beton from images."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``'256MiB'``, ``'1GB'``, ``'500000'`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 256MiB, 1GB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality {value} must be in 1..100")
    return value


def _cmd_write(args) -> int:
    from .shards import ImageFolderInput, SyntheticInput, write_beton, write_wds

    if args.synthetic:
        items = SyntheticInput(args.synthetic, args.synthetic_size, args.synthetic_seed)
    else:
        items = ImageFolderInput(args.imagefolder)
    fmt = args.format or ("beton" if args.out.endswith(".beton") else "wds")
    common = dict(max_side=args.max_side, quality=args.quality, shuffle=not args.no_shuffle,
                  seed=args.seed, workers=args.workers, progress=not args.no_progress,
                  overwrite=args.overwrite)
    if fmt == "beton":
        path = write_beton(items, args.out, **common)
    else:
        path = write_wds(items, args.out, max_bytes=args.max_size, max_count=args.max_count,
                         prefix=args.prefix, **common)
    print(f"wrote {path}")
    return 0


def _cmd_index(args) -> int:
    from .shards import index_shards

    print(f"wrote {index_shards(args.urls, args.out, args.allow_pipe)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("shards", help="write webdataset shards or an FFCV .beton; index shards")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    w = ssub.add_parser(
        "write", help="ImageFolder or generated images -> tar shards (a folder) or a .beton",
        description="Write an ImageFolder (or generated images) as webdataset tar shards with an "
                    "index.json, or as an FFCV .beton (OUT ending in .beton). Shard writing resumes "
                    "where an interrupted run stopped when rerun with the same arguments.")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagefolder", metavar="ROOT", help="folder of class sub-folders (its train/ if present)")
    src.add_argument("--synthetic", type=_positive, metavar="N", help="generate N synthetic images instead")
    w.add_argument("out", help="output folder for shards, or a file ending in .beton")
    w.add_argument("--format", choices=("wds", "beton"), help="default: beton if OUT ends in .beton, else wds")
    w.add_argument("--max-size", type=parse_size, default=parse_size("256MiB"),
                   help="largest shard (wds; default 256MiB)")
    w.add_argument("--max-count", type=_positive, help="most samples per shard (wds)")
    w.add_argument("--max-side", type=_positive, help="re-encode: shrink so the longer side is at most this")
    w.add_argument("--quality", type=_quality, help="re-encode as JPEG at this quality (default 90 when re-encoding)")
    w.add_argument("--no-shuffle", action="store_true", help="keep the input order (ImageFolder: sorted by class)")
    w.add_argument("--seed", type=int, default=0, help="seed of the write order")
    w.add_argument("--workers", type=int, default=0, help="processes that read and encode images")
    w.add_argument("--prefix", default="shard", help="shard file prefix (wds)")
    w.add_argument("--synthetic-size", type=_positive, default=64, help="side of generated images")
    w.add_argument("--synthetic-seed", type=int, default=0, help="seed of the generated set")
    w.add_argument("--overwrite", action="store_true", help="replace what OUT holds instead of resuming")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_cmd_write)

    i = ssub.add_parser("index", help="count the samples of existing shards into an index .json",
                        description="Count the samples of tar shards once and write an index, so a "
                                    "loader (data.urls=INDEX.json) need not scan them at start.")
    i.add_argument("urls", nargs="+", help="shards: paths, brace patterns, globs or pipe: commands")
    i.add_argument("--out", required=True, help="index file to write")
    i.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs")
    i.set_defaults(func=_cmd_index)

