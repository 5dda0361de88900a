"""webdataset tar shards, read by a small streaming reader of our own.

Why not the ``webdataset`` package: exactly-once splits and exact resume need to know which sample
of which shard each reader takes, which its pipeline (shard split, shuffle buffer) does not expose.
Here a shard is a tar whose members are grouped into samples by key (``dir/name.ext`` -> key
``dir/name``, consecutive members with one key are one sample), sample ids come from per-shard
counts (an index JSON, or a header scan at start), and ``read(ids)`` streams each shard once,
keeping only the samples asked for; where a shard has a member table (written with it), the
reader seeks straight to the images it wants instead. Compressed shards (``.tar.gz``/``.tgz``,
``.tar.bz2``, ``.tar.xz``, told by their first bytes, whatever their name) are read the same way,
decompressed as they stream: no member table, so a reader decompresses its shard from the start up
to the last sample it wants (once per shard and epoch: the plan hands each worker runs of a shard).

URLs: local paths, brace patterns (``train-{000000..000127}.tar``, ``{a,b}``), globs, an index
``.json`` listing shards, and ``pipe:COMMAND`` (a shell command writing a tar to stdout), which is
refused unless ``allow_pipe`` is set, since it runs whatever the config says.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import itertools
import json
import logging
import lzma
import os
import re
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mimscale.errors import DataError

from .base import Record, check_ids

log = logging.getLogger("mimscale.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
LABEL_EXTS = ("cls", "label")
INDEX_KIND = "wids-shard-index-v1"  # the `wids` package's index: its ShardListDataset reads ours
INDEX_NAME = "index.json"
_KEY = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # key = dir + name up to its first dot
_BRACE = re.compile(r"\{([^{}]*)\}")


# --------------------------------------------------------------------------- URLs

def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar, a-01.tar, a-02.tar``; ``{x,y}`` alternatives; nested in order."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(hi) < int(lo):
            raise DataError(f"brace range {{{body}}} in {pattern!r} is empty ({hi} < {lo})")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"cannot expand {{{body}}} in {pattern!r}: use {{N..M}} or {{a,b,...}}")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def resolve_urls(urls, allow_pipe: bool = False) -> tuple[list[str], list[int] | None]:
    """The shard list ``urls`` names, checked to exist, and their counts when an index gives them.

    Fails at once on an empty spec, a pattern or glob that matches nothing, a missing file or a
    ``pipe:`` URL without ``allow_pipe``, naming the offending entry.
    """
    specs = [urls] if isinstance(urls, str) else list(urls or [])
    specs = [str(s).strip() for s in specs if str(s).strip()]
    if not specs:
        raise DataError("data.urls is empty: give tar shards (paths, a brace pattern like "
                         "'train-{000000..000127}.tar', a glob), an index .json or pipe: commands")
    shards: list[str] = []
    counts: list[int] | None = []
    for spec in specs:
        if spec.endswith(".json") and not spec.startswith("pipe:"):
            listed, n = read_index(spec)
            shards += listed
            counts = counts + n if counts is not None else None
            for s in listed:
                _check_shard(s, allow_pipe, spec)
            continue
        counts = None
        expanded = expand_braces(spec)
        for s in expanded:
            if s.startswith("file://"):
                s = s[len("file://"):]
            if not s.startswith("pipe:") and any(c in s for c in "*?["):
                matched = sorted(glob.glob(s))
                if not matched:
                    raise FileNotFoundError(f"data.urls: {s!r} matches no files")
                shards += matched
                continue
            _check_shard(s, allow_pipe, spec if len(expanded) > 1 else None)
            shards.append(s)
    return shards, counts


def _check_shard(url: str, allow_pipe: bool, spec: str | None) -> None:
    origin = f" (from {spec!r})" if spec and spec != url else ""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(f"data.urls: {url!r}{origin} runs a shell command; set data.allow_pipe=true "
                             "to allow pipe: URLs")
        return
    if re.match(r"^[a-z][a-z0-9+.-]*://", url):
        raise DataError(f"data.urls: {url!r}{origin}: unsupported scheme; use local paths or "
                         "pipe:COMMAND (e.g. 'pipe:curl -s URL' with data.allow_pipe=true)")
    if not os.path.isfile(url):
        raise FileNotFoundError(f"data.urls: shard {url}{origin} does not exist")


# --------------------------------------------------------------------------- index

def read_index(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Shards (resolved against the index's folder) and sample counts of an index JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.urls: index {path} does not exist")
    doc = json.loads(path.read_text())
    entries = doc.get("shardlist") if isinstance(doc, dict) else None
    if not entries:
        raise DataError(f"index {path} lists no shards (expected a 'shardlist' of "
                        "{'url': ..., 'nsamples': ...})")
    urls = [e["url"] if e["url"].startswith("pipe:") or os.path.isabs(e["url"])
            else str(path.parent / e["url"]) for e in entries]
    return urls, [int(e["nsamples"]) for e in entries]


def index_document(entries: list[dict], **extra) -> dict:
    """An index JSON: ``entries`` are ``{'url', 'nsamples', 'filesize'}`` with URLs relative to it."""
    return {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": entries, **extra}


def sibling_index_counts(shards: list[str]) -> list[int] | None:
    """Counts from ``index.json`` next to local shards when it lists every one at its current size."""
    folders = {os.path.dirname(os.path.abspath(s)) for s in shards}
    if len(folders) != 1 or any(s.startswith("pipe:") for s in shards):
        return None
    index = Path(folders.pop()) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        doc = json.loads(index.read_text())
        known = {os.path.abspath(index.parent / e["url"]): e for e in doc["shardlist"]}
        entries = [known[os.path.abspath(s)] for s in shards]
        if all(e.get("filesize") == os.path.getsize(s) for e, s in zip(entries, shards)):
            return [int(e["nsamples"]) for e in entries]
    except (KeyError, ValueError, OSError, TypeError):
        pass
    return None


# --------------------------------------------------------------------------- reading tars

# a compressed tar by its first bytes -> how tarfile and Python open it
_COMPRESSIONS = ((b"\x1f\x8b", "gz", gzip.open), (b"BZh", "bz2", bz2.open),
                 (b"\xfd7zXZ\x00", "xz", lzma.open))
# what reading a damaged shard raises: tar errors, truncation, and each decompressor's own errors
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_OPEN_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)  # not a missing file


def compression(path: str) -> str | None:
    """``'gz'``, ``'bz2'`` or ``'xz'`` for a compressed local shard, None for a plain tar."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind, _ in _COMPRESSIONS if head.startswith(magic)), None)


def _open_bytes(path: str):
    """A local shard's tar bytes as a binary file (decompressed as it is read, when compressed)."""
    kind = compression(path)
    opener = next((o for _, k, o in _COMPRESSIONS if k == kind), open)
    return opener(path, "rb")


def split_key(name: str) -> tuple[str, str] | None:
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


class _open_tar:
    """A tar opened for one pass: seekable for local files (unread members are skipped by
    seeking), a stream for ``pipe:`` commands (the process is ended when we are done).
    ``quick`` walks a local tar's headers with ``PlainTar`` instead of tarfile."""

    def __init__(self, url: str, quick: bool = False):
        self.url, self.proc, self.quick = url, None, quick

    def __enter__(self) -> tarfile.TarFile | PlainTar:
        if self.url.startswith("pipe:"):
            self.proc = subprocess.Popen(self.url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, bufsize=1 << 20)
            self.tar = tarfile.open(fileobj=self.proc.stdout, mode="r|*")
        elif self.quick:
            self.tar = PlainTar(self.url)
        else:
            self.tar = tarfile.open(self.url, mode=f"r:{compression(self.url) or ''}")
        return self.tar

    def __exit__(self, *exc) -> None:
        self.tar.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()


class NotPlain(Exception):
    """A tar that ``PlainTar`` leaves to tarfile: a bad checksum, a truncated header, or an
    extension other than pax ``path`` / ``size`` records (GNU long names, sparse files, ...)."""


class _Member:
    __slots__ = ("name", "offset_data", "size")

    def __init__(self, name: str, offset_data: int, size: int):
        self.name, self.offset_data, self.size = name, offset_data, size

    def isfile(self) -> bool:
        return True


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR, _NO_DATA = (b"0", b"\0", b"7"), (b"1", b"2", b"3", b"4", b"5", b"6")


class PlainTar:
    """The regular files of a local tar, from their 512-byte headers alone.

    Why: tarfile's header parsing costs a worker more per sample than reading the JPEG. This walk
    reads what tarfile would (ustar names with their prefix, pax ``path`` and ``size`` records as
    Python's and webdataset's writers emit them) and raises ``NotPlain`` on anything else, so the
    caller can read that shard with tarfile instead.
    """

    def __init__(self, path: str):
        self.fileobj = _open_bytes(path)  # only ever seeks forward, which a decompressor can

    def close(self) -> None:
        self.fileobj.close()

    def __iter__(self) -> Iterator[_Member]:
        f, pos, pax = self.fileobj, 0, {}
        while True:
            f.seek(pos)
            head = f.read(_BLOCK)
            if head == _ZERO_BLOCK:
                return
            if len(head) < _BLOCK:
                raise NotPlain("no end-of-archive block")
            try:
                size = int(head[124:136].strip(b" \0") or b"0", 8)
                checksum = int(head[148:156].strip(b" \0"), 8)
            except ValueError:
                raise NotPlain("a non-octal size or checksum") from None
            if checksum != sum(head) - sum(head[148:156]) + 8 * 32:  # the field counts as spaces
                raise NotPlain("bad header checksum")
            kind, data = head[156:157], pos + _BLOCK
            if kind == b"x":  # records for the next header
                if pax:
                    raise NotPlain("two pax headers in a row")
                f.seek(data)
                pax, pos = _pax_records(f.read(size)), data + _blocks(size)
                continue
            if kind in _NO_DATA:
                pos, pax = data, {}
                continue
            if kind not in _REGULAR:
                raise NotPlain(f"header type {kind!r}")
            raw, prefix = _cstr(head[:100]), _cstr(head[345:500])
            try:
                size = int(pax.get("size", size))
            except ValueError:
                raise NotPlain("a non-integer pax size") from None
            name = pax.get("path", f"{prefix}/{raw}" if prefix else raw)
            pos, pax = data + _blocks(size), {}
            if kind == b"\0" and raw.endswith("/"):  # an old-style directory
                continue
            yield _Member(name, data, size)


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _cstr(field: bytes) -> str:
    return os.fsdecode(field.split(b"\0", 1)[0])


def _pax_records(data: bytes) -> dict[str, str]:
    """``'LENGTH key=value\\n'`` records; only ``path`` and ``size`` matter for reading files."""
    records, pos = {}, 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise NotPlain("a malformed pax record") from None
        record = data[space + 1:pos + length]
        key, eq, value = record[:-1].partition(b"=")
        if length <= 0 or not eq or record[-1:] != b"\n":
            raise NotPlain("a malformed pax record")
        records[os.fsdecode(key)] = os.fsdecode(value)
        pos += length
    if any(k not in _PAX_KEYS for k in records):
        raise NotPlain(f"pax records {sorted(set(records) - _PAX_KEYS)}")
    return records


# pax records that do not change which bytes a member's name or data are
_PAX_KEYS = frozenset({"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname",
                       "linkpath", "comment"})


def iter_members(tar: tarfile.TarFile | PlainTar) -> Iterator[tuple[int, str, str, tarfile.TarInfo]]:
    """``(sample index, key, ext, member)`` for every file member that belongs to a sample."""
    index, last = -1, None
    for m in tar:
        if not m.isfile():
            continue
        parts = split_key(m.name)
        if parts is None:
            continue
        key, ext = parts
        if key != last:
            index, last = index + 1, key
        yield index, key, ext, m


def count_samples(url: str) -> int:
    """Samples in a shard, from its headers (a truncated tar counts what is readable, with a warning)."""
    n = 0
    try:
        with _open_tar(url) as tar:
            try:
                for index, *_ in iter_members(tar):
                    n = index + 1
            except READ_ERRORS as e:
                log.warning("shard %s is damaged after %d samples (%s); later samples are not used", url, n, e)
    except _OPEN_ERRORS as e:  # from the open: not one readable header (a zero-byte file, not a tar)
        raise DataError(f"shard {url} is not a tar file ({e}): an interrupted copy or another kind of "
                        "file; write it again or leave it out of data.urls") from None
    return n


def read_shard(url: str, wanted: set[int]) -> dict[int, dict]:
    """``{sample index: {'key', 'members': {ext: bytes or None}} or {'error'}}`` for ``wanted``.

    Reads one pass and stops after the last wanted sample. Only image and label members are read
    (``None`` stands for the others); members of unwanted samples are skipped by seeking (local
    files) or by reading past them (pipes). A damaged tar yields an ``error`` for every wanted
    sample not completely read. Local tars are walked by ``PlainTar``; those it does not take
    are read again by tarfile, whose errors the messages keep.
    """
    if not url.startswith("pipe:"):
        table = read_member_table(url)
        if table is not None:
            with contextlib.suppress(StaleTable):
                return _read_by_table(url, table, wanted)
        with contextlib.suppress(NotPlain):
            return _read_samples(url, wanted, quick=True)
    return _read_samples(url, wanted, quick=False)


def _read_samples(url: str, wanted: set[int], quick: bool) -> dict[int, dict]:
    out: dict[int, dict] = {}
    last_wanted = max(wanted)
    current, seen = None, 0
    try:
        with _open_tar(url, quick) as tar:
            for index, key, ext, m in iter_members(tar):
                seen = index + 1
                if index > last_wanted:
                    break
                current = index if index in wanted else None
                if current is None:
                    continue
                sample = out.setdefault(index, {"key": key, "members": {}})
                sample["members"][ext] = _read_member(tar, m) if ext in _KEEP else None
            current = None
    except READ_ERRORS as e:
        if current is not None:
            out[current] = {"key": out[current]["key"], "error": f"damaged shard while reading it: {e}"}
        for i in wanted - out.keys():
            out[i] = {"key": f"#{i}", "error": f"damaged shard, sample not reached: {e}"}
        return out
    for i in wanted - out.keys():
        out[i] = {"key": f"#{i}", "error": f"missing: the shard ends after {seen} samples "
                                           f"(truncated?) but its count says more"}
    return out


_KEEP = frozenset(IMAGE_EXTS + LABEL_EXTS)


# --------------------------------------------------------------------------- member tables
#
# ``<shard>.members.json`` (written with the shards, or by ``mimscale shards index``) lists where each
# sample's image starts and how long it is, and its label, so a reader seeks straight to the images
# it wants instead of walking every header up to them (a .beton's offset table, for tars). It is
# used only while the shard has the size it records, and each read checks the member's own header
# name, so a table that no longer describes its shard is never trusted.

TABLE_SUFFIX = ".members.json"
TABLE_KIND = "mimscale-shard-members-v1"


class StaleTable(Exception):
    """A member table that does not describe its shard any more: the shard is walked instead."""


def member_table(url: str) -> dict:
    """The table of a local shard, from one pass over its headers (labels are read, images not).
    A sample's image and label are the ones ``to_record`` would pick."""
    try:
        samples = _table_rows(url, quick=True)
    except NotPlain:
        samples = _table_rows(url, quick=False)
    return {"__kind__": TABLE_KIND, "filesize": os.path.getsize(url),
            "fields": ["key", "exts", "image_ext", "offset", "size", "label"], "samples": samples}


def _table_rows(url: str, quick: bool) -> list:
    rows: list[list] = []
    found: list[dict] = []
    with _open_tar(url, quick) as tar:
        for index, key, ext, m in iter_members(tar):
            if index == len(rows):
                rows.append([key, [], None, 0, 0, None])
                found.append({})
            rows[index][1].append(ext)
            if ext in _KEEP and ext not in found[index]:
                found[index][ext] = (int(m.offset_data), int(m.size),
                                     _read_member(tar, m) if ext in LABEL_EXTS else None)
    for row, members in zip(rows, found):
        image = next((e for e in IMAGE_EXTS if e in members), None)
        if image is not None:
            row[2:5] = [image, *members[image][:2]]
        label = next((members[e][2] for e in LABEL_EXTS if e in members), None)
        if label is not None:
            with contextlib.suppress(ValueError):
                row[5] = int(label.decode().strip())
    return rows


def write_member_table(url: str) -> Path:
    if compression(url):  # a decompressor cannot seek to an offset: such shards are walked
        raise ValueError(f"{url} is compressed: member tables are for plain tars only")
    path = Path(url + TABLE_SUFFIX)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(member_table(url), separators=(",", ":")))
    os.replace(tmp, path)
    return path


def read_member_table(url: str) -> list | None:
    """The samples of ``url``'s table, or None when there is none or it is not for this shard."""
    path = url + TABLE_SUFFIX
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("__kind__") != TABLE_KIND or doc.get("filesize") != os.path.getsize(url):
            return None
        return doc["samples"]
    except (OSError, ValueError, AttributeError, KeyError):
        return None


def _check_header(url: str, head: bytes, name: str) -> None:
    """The member header in front of an image names that image (ustar name and prefix; a name too
    long for them, carried by a pax record, is not checked)."""
    raw, prefix = _cstr(head[:100]), _cstr(head[345:500])
    stored = f"{prefix}/{raw}" if prefix else raw
    if len(head) < _BLOCK or (len(raw) < 99 and stored.lower() != name.lower()):
        raise StaleTable(f"{url}: the table says {name}, the shard has {stored!r} there")


def _read_by_table(url: str, table: list, wanted: set[int]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    with open(url, "rb") as f:
        for i in sorted(wanted):
            if i >= len(table):  # the walk tells a truncated shard from an outdated table
                raise StaleTable(f"{url}: sample {i} is not in its table of {len(table)}")
            key, exts, ext, offset, size, label = table[i]
            members = dict.fromkeys(exts)
            if ext is not None:
                f.seek(offset - _BLOCK)
                block = f.read(_BLOCK + size)
                _check_header(url, block[:_BLOCK], f"{key}.{ext}")
                data = block[_BLOCK:]
                if len(data) != size:
                    out[i] = {"key": key, "error": "damaged shard while reading it: unexpected end of data"}
                    continue
                members[ext] = data
            if label is not None:  # under the label member's own name, as to_record looks for it
                members[next(e for e in LABEL_EXTS if e in members)] = str(label).encode()
            out[i] = {"key": key, "members": members}
    return out


def _read_member(tar: tarfile.TarFile | PlainTar, m: tarfile.TarInfo | _Member) -> bytes:
    if not getattr(tar.fileobj, "seekable", lambda: False)():  # a pipe: read in stream order
        return tar.extractfile(m).read()
    tar.fileobj.seek(m.offset_data)  # direct read: tarfile seeks back to the next header itself
    data = tar.fileobj.read(m.size)
    if len(data) != m.size:
        raise tarfile.ReadError(f"unexpected end of data in {m.name}")
    return data


def to_record(sample_id: int, url: str, sample: dict) -> Record:
    rec = Record(sample_id, url, sample["key"])
    if "error" in sample:
        rec.error = sample["error"]
        return rec
    members = sample["members"]
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        rec.error = (f"missing key: no image member (.{', .'.join(IMAGE_EXTS)}) among "
                     f"[{', '.join(sorted(members))}]")
        return rec
    rec.data = members[ext]
    if not rec.data:
        rec.error = f"zero-byte image member {sample['key']}.{ext}"
    label = next((members[e] for e in LABEL_EXTS if e in members), None)
    if label is not None:
        with contextlib.suppress(ValueError):  # an unreadable label is just unknown (-1)
            rec.label = int(label.decode().strip())
    return rec


class TarShardSource:
    """webdataset shards as a loader source (see the module docstring)."""

    name = "wds"

    def __init__(self, urls, allow_pipe: bool = False, shard_sizes: list[int] | None = None):
        self.shards, counts = resolve_urls(urls, allow_pipe)
        if shard_sizes is None:
            shard_sizes = counts or sibling_index_counts(self.shards)
        if shard_sizes is None:
            if len(self.shards) > 64:
                log.warning("counting the samples of %d shards from their headers; write an index "
                            "(mimscale shards index) to skip this", len(self.shards))
            shard_sizes = [count_samples(s) for s in self.shards]
        if len(shard_sizes) != len(self.shards):
            raise ValueError(f"{len(shard_sizes)} counts for {len(self.shards)} shards")
        self.shard_sizes = [int(n) for n in shard_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise DataError(f"data.urls: the {len(self.shards)} shard(s) hold no samples "
                             f"(first: {self.shards[0]})")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, ids) -> Iterator[Record]:
        ids = check_ids(ids, len(self))
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for shard, run in itertools.groupby(range(len(ids)), key=lambda i: shard_of[i]):
            run_ids = ids[list(run)]
            local = (run_ids - self.offsets[shard]).tolist()
            url = self.shards[shard]
            samples = read_shard(url, set(local))
            for sid, i in zip(run_ids.tolist(), local):
                yield to_record(sid, url, samples[i])
