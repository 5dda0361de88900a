"""Write webdataset tar shards: size-bounded, indexed, resumable.

A sample ``<key>`` is ``<key>.<ext>`` (the image), ``<key>.cls`` (its label, when known) and
``<key>.json`` (where it came from, or its generated objects). Shards ``<prefix>-000000.tar``, ...
are at most ``max_bytes`` (a single larger sample gets a shard of its own) and ``max_count``
samples. ``index.json`` lists every finished shard with its sample count and byte size (the
``wids`` package's shard index format), plus the job's parameters and how far it got; next to each
shard, ``<shard>.members.json`` records where each image starts (see ``sources/wds.py``).

Resumable: a shard is written under a temporary name and renamed when complete, and the index is
rewritten (atomically) after each one. An interrupted job, run again with the same arguments,
discards its unfinished shard and continues after the last complete one; tar headers carry no
time stamps or owners, so the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from functools import partial
from pathlib import Path

from ..sources.wds import (
    INDEX_NAME,
    compression,
    count_samples,
    index_document,
    resolve_urls,
    write_member_table,
)
from .common import parallel_map, progress_bar, write_json, write_order
from .encode import encode_image

log = logging.getLogger("mimscale.data")


def _prepare(items, max_side, quality, i: int):
    """Load and encode input ``i``: ``(True, (data, ext, label, meta))`` or ``(False, error)``."""
    try:
        item = items.load(i)
        data, ext = encode_image(item.data, max_side, quality)
        return True, (data, ext, item.label, item.meta)
    except Exception as e:  # noqa: BLE001 - a bad input is skipped and reported, not fatal
        return False, f"{type(e).__name__}: {e}"


def _members(key: str, data: bytes, ext: str, label: int, meta: dict) -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", data)]
    if label >= 0:
        members.append((f"{key}.cls", str(label).encode()))
    if meta:
        members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def _tar_size(offset: int) -> int:
    """Bytes of a tar closed at ``offset``: two zero blocks, padded to a 10 KiB record."""
    record = tarfile.RECORDSIZE
    return -(-(offset + 2 * tarfile.BLOCKSIZE) // record) * record


def _member_bytes(members) -> int:
    return sum(tarfile.BLOCKSIZE + -(-len(d) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for _, d in members)


class _ShardWriter:
    """One shard being filled, under a temporary name until ``close``."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed in close()
        self.count = 0

    def fits(self, members, max_bytes: int, max_count: int | None) -> bool:
        if self.count == 0:
            return True
        if max_count and self.count >= max_count:
            return False
        return _tar_size(self.tar.offset + _member_bytes(members)) <= max_bytes

    def add(self, members) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> dict:
        self.tar.close()
        os.replace(self.tmp, self.path)
        write_member_table(str(self.path))  # readers seek straight to the images (sources/wds.py)
        return {"url": self.path.name, "nsamples": self.count, "filesize": self.path.stat().st_size}


def _start(out: Path, params: dict, overwrite: bool) -> dict:
    """The job's saved state to continue from (or a fresh one); refuses to mix different jobs."""
    index = out / INDEX_NAME
    fresh = {"entries": [], "position": 0, "skipped": [], "complete": False}
    if index.exists():
        doc = json.loads(index.read_text())
        state = doc.get("mimscale", {})
        if state.get("params") == params and not overwrite:
            entries = doc["shardlist"]
            for e in entries:
                p = out / e["url"]
                if not p.is_file() or p.stat().st_size != e["filesize"]:
                    raise RuntimeError(f"{p} is missing or changed since it was written; rerun "
                                       "with --overwrite to start again")
            return {"entries": entries, "position": state["next_position"],
                    "skipped": state.get("skipped", []), "complete": state.get("complete", False)}
        if not overwrite:
            raise FileExistsError(f"{out} holds shards of a different job ({index}); pass "
                                  "--overwrite to replace them, or choose another folder")
        for e in doc.get("shardlist", []):
            (out / e["url"]).unlink(missing_ok=True)
        index.unlink()
    elif any(out.glob("*.tar")) and not overwrite:
        raise FileExistsError(f"{out} already holds .tar files without an {INDEX_NAME}; pass "
                              "--overwrite or choose another folder")
    return fresh


def write_wds(items, out: str | os.PathLike, max_bytes: int = 256 << 20, max_count: int | None = None,
              max_side: int | None = None, quality: int | None = None, shuffle: bool = True,
              seed: int = 0, workers: int = 0, prefix: str = "shard", progress: bool = True,
              overwrite: bool = False) -> Path:
    """Write ``items`` (``shards.inputs``) as shards into folder ``out``; returns its index path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {**items.fingerprint(), "format": "wds", "max_bytes": max_bytes, "max_count": max_count,
              "max_side": max_side, "quality": quality, "shuffle": shuffle, "seed": seed, "prefix": prefix}
    state = _start(out, params, overwrite)
    index = out / INDEX_NAME
    if state["complete"]:
        log.warning("%s is already complete; nothing to do", index)
        return index
    for stale in out.glob(f"{prefix}-*.tar.tmp"):
        stale.unlink()
    order = write_order(len(items), shuffle, seed)
    entries, skipped, start = state["entries"], state["skipped"], state["position"]
    pending: list[dict] = []  # skipped inputs of the shard being written

    def save(position: int, complete: bool) -> None:
        write_json(index, index_document(entries, mimscale={
            "params": params, "next_position": position, "complete": complete, "skipped": skipped}))

    shard = None
    results = parallel_map(partial(_prepare, items, max_side, quality), order[start:].tolist(), workers)
    with progress_bar(len(order), start, f"shards {out.name}", progress) as advance:
        for position, (i, (ok, value)) in enumerate(zip(order[start:].tolist(), results), start=start):
            advance()
            if not ok:
                pending.append({"position": position, "input": items.describe(i), "error": value})
                log.warning("skipped %s: %s", items.describe(i), value)
                continue
            members = _members(f"{position:08d}", *value)
            if shard is not None and not shard.fits(members, max_bytes, max_count):
                entries.append(shard.close())
                skipped += pending
                pending, shard = [], None
                save(position, False)
            if shard is None:
                shard = _ShardWriter(out / f"{prefix}-{len(entries):06d}.tar")
            shard.add(members)
    if shard is not None:
        entries.append(shard.close())
    skipped += pending
    save(len(order), True)
    if skipped:
        log.warning("%d input(s) could not be read and were skipped (listed in %s)", len(skipped), index)
    return index


def index_shards(urls, out: str | os.PathLike, allow_pipe: bool = False) -> Path:
    """Count the samples of existing shards and write an index (URLs relative to it when local)."""
    out = Path(out)
    shards, _ = resolve_urls(urls, allow_pipe)
    entries = []
    for s in shards:
        url = s if s.startswith("pipe:") else os.path.relpath(os.path.abspath(s), out.parent.resolve())
        if s.startswith("pipe:"):
            entry = {"url": url, "nsamples": count_samples(s)}
        elif compression(s):  # .tar.gz and the like: counted; no member table (nothing to seek)
            entry = {"url": url, "nsamples": count_samples(s), "filesize": os.path.getsize(s)}
        else:  # the member table gives the count and lets readers seek straight to the images
            entry = {"url": url, "nsamples": len(json.loads(write_member_table(s).read_text())["samples"]),
                     "filesize": os.path.getsize(s)}
        entries.append(entry)
    write_json(out, index_document(entries))
    return out
