"""Snapshot files: atomic writes (temp file, fsync, rename), pruning to the newest K, reading back.

The format itself lives in ``snapshot.py``; this module only moves its bytes to and from disk, off
the event loop. Files are gzip-compressed and named ``snapshot-<taken_at in ms, 15 digits>-<node>.jsonl.gz``.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import re
import secrets
import zlib
from collections.abc import AsyncIterable, Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from ..errors import InvalidInput
from .snapshot import (
    Record,
    Snapshot,
    SnapshotError,
    SnapshotHeader,
    _Lines,
    _show,
    gather,
    iter_decode,
)


class SnapshotFileError(OSError):
    """The file system refused a snapshot file or its directory (a full disk, no permission, a file
    where the directory should be): told apart from the database's errors of the same pass, some
    of which are ``OSError`` too (an unreachable server)."""

    @classmethod
    def of(cls, error: OSError) -> SnapshotFileError:
        return cls(error.errno, error.strerror or str(error), error.filename)


_CHUNK_BYTES = 256 * 1024  # per thread hop, writing and reading
_FILE_NAME = re.compile(r"snapshot-(\d{15})-([A-Za-z0-9._-]{1,64})\.jsonl\.gz")
_MAX_TAKEN_AT_S = 1e12  # keeps the millisecond stamp in its 15 digits (until the year 33658)
_TEMP_NAME = re.compile(r"\.snapshot-\d{15}-([A-Za-z0-9._-]{1,64})\.jsonl\.gz\.[0-9a-f]{12}\.tmp")
#: A temp file of ours untouched this long was left by a writer that died (SIGKILL, power loss): a
#: live write appends every 256 KiB chunk, so it is never this old.
STALE_TEMP_S = 3600.0


def snapshot_name(header: SnapshotHeader) -> str:
    """``snapshot-<taken_at in ms, 15 digits>-<node>.jsonl.gz``: sorts by time, one per node and ms."""
    name = f"snapshot-{int(min(header.taken_at, _MAX_TAKEN_AT_S) * 1000):015d}-{header.node}.jsonl.gz"
    if header.taken_at >= _MAX_TAKEN_AT_S or not _FILE_NAME.fullmatch(name):
        raise SnapshotError(f"node {_show(header.node)} at {header.taken_at!r} cannot name a snapshot file")
    return name


def _snapshots(directory: Path) -> list[tuple[int, str, Path]]:
    """(millis, node, path) of every snapshot file in ``directory``, oldest first; nothing else."""
    with os.scandir(directory) as entries:
        found = [(_FILE_NAME.fullmatch(e.name), e) for e in entries if e.is_file(follow_symlinks=False)]
    return sorted((int(match[1]), match[2], Path(e.path)) for match, e in found if match)


class _TempFile:
    """A snapshot being written: gzip into a hidden temp file, then published by an atomic rename.

    Every method runs on one worker thread in submission order, so a ``discard`` queued after a write
    whose awaiting task was cancelled still runs only once that write is done with the file.
    """

    def __init__(self, directory: Path, final: Path) -> None:
        self.directory, self.final = directory, final
        self.path = directory / f".{final.name}.{secrets.token_hex(6)}.tmp"
        self.gzip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip container
        self.created = self.published = False

    def create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Unbuffered, so closing it (in discard) has nothing left to flush, or to fail on.
        self.file = io.FileIO(self.path, "xb")
        self.created = True

    def write(self, data: bytes) -> None:
        self.file.write(self.gzip.compress(data))

    def commit(self) -> None:
        self.file.write(self.gzip.flush())
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.path, self.final)
        self.published = True
        if os.name == "posix":  # make the rename itself durable; Windows cannot open a directory
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        if self.created and not self.published:
            try:
                self.file.close()
            finally:
                self.path.unlink(missing_ok=True)

    def prune(self, node: str, keep: int) -> None:
        """Delete all but ``node``'s newest ``keep`` snapshots, but never the one just written, and
        ``node``'s temp files that a killed writer left behind (unmodified for ``STALE_TEMP_S``)."""
        mine = [path for _, owner, path in _snapshots(self.directory) if owner == node]
        # Files named after the one just written were named by a clock that was ahead and has been
        # set back since: they hold an older state, so they are the first to go.
        ahead = [path for path in mine if path.name > self.final.name]
        mine = ahead + [path for path in mine if path.name <= self.final.name]
        for path in mine[:-keep]:
            path.unlink(missing_ok=True)
        written = self.final.stat().st_mtime
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = _TEMP_NAME.fullmatch(entry.name)
                if match is None or match[1] != node or not entry.is_file(follow_symlinks=False):
                    continue
                # Compared with the file just written, so both times come from the same file system.
                if entry.stat(follow_symlinks=False).st_mtime < written - STALE_TEMP_S:
                    Path(entry.path).unlink(missing_ok=True)


async def write_snapshot(
    directory: Path, header: SnapshotHeader, records: Iterable[Record] | AsyncIterable[Record], keep: int
) -> Path:
    """Write a gzip snapshot atomically into ``directory`` (created if missing); return its path.

    Readers only ever see complete files: the data goes to a hidden ``.tmp`` file that is fsynced and
    renamed into place. On any error or cancellation before the rename the temp file is removed and
    no snapshot appears. Then only ``header.node``'s newest ``keep`` snapshots are kept, and its temp
    files left by a killed writer (see ``STALE_TEMP_S``) are removed; other files, other nodes'
    snapshots and temp files included, are never touched. File I/O and compression run on a worker
    thread, about 256 KiB per hop, so the event loop never waits on the disk.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidInput(f"keep must be an integer >= 1, got {_show(keep)}")
    lines = _Lines(header)
    temp = _TempFile(Path(directory), Path(directory) / snapshot_name(header))
    loop = asyncio.get_running_loop()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-tracker-snapshot")
    pending, pending_bytes = [lines.header], 0

    async def run(call: Callable[[], None]) -> None:
        try:
            await loop.run_in_executor(worker, call)
        except OSError as error:
            raise SnapshotFileError.of(error) from error

    async def add(line: bytes) -> None:
        nonlocal pending_bytes
        pending.append(line)
        if (pending_bytes := pending_bytes + len(line)) >= _CHUNK_BYTES:
            chunk, pending_bytes = b"".join(pending), 0
            pending.clear()
            await run(partial(temp.write, chunk))

    try:
        await run(temp.create)
        if isinstance(records, AsyncIterable):
            iterator = aiter(records)
            try:
                async for record in iterator:
                    await add(lines.record(record))
            finally:  # an async generator stopped early must release what it holds (a DB cursor)
                if (aclose := getattr(iterator, "aclose", None)) is not None:
                    await aclose()
        else:
            for record in records:
                await add(lines.record(record))
        pending.append(lines.trailer())
        await run(partial(temp.write, b"".join(pending)))
        await run(temp.commit)
        await run(partial(temp.prune, header.node, keep))
    except BaseException:
        await run(temp.discard)
        raise
    finally:
        worker.shutdown(wait=False)  # a discard still queued (cancelled twice) runs all the same
    return temp.final


def iter_snapshot(path: Path) -> Generator[SnapshotHeader | Record, None, None]:
    """The file's header, then each record as it is decoded (``iter_decode``: the trailer is checked
    after the last one, so whatever the records fed stays provisional until this ends). Blocking:
    iterate it on a worker thread. Holds one 256 KiB chunk and one line at a time; ``SnapshotError``
    names the file and the line."""
    newlines = 0

    def chunks(stream: gzip.GzipFile) -> Iterator[bytes]:
        nonlocal newlines
        while chunk := stream.read(_CHUNK_BYTES):
            newlines += chunk.count(b"\n")
            yield chunk

    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            yield from iter_decode(chunks(stream))
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise SnapshotError(
            f"{path.name}: line {newlines + 1} or later: corrupt gzip data ({error})"
        ) from None
    except SnapshotError as error:
        raise SnapshotError(f"{path.name}: {error}") from None


def _read(path: Path) -> Snapshot:
    items = iter_snapshot(path)
    header = next(items)
    assert isinstance(header, SnapshotHeader)  # iter_decode yields the header first, or raises
    return gather(header, items)  # type: ignore[arg-type]  # only records follow the header


#: How a peer record starts in the files this tracker writes (``_Lines``: the tag first, compact).
_PEER_TAG = b'"t":"peer"'


def count_records(path: Path) -> tuple[int, int]:
    """(records, peer records) of a snapshot file, counted without decoding it: its lines less the
    header and the trailer, and the peer tags as this tracker writes them. Blocking; an estimate
    for progress (exact for this tracker's files; a file written otherwise may count fewer peers),
    never a check: only decoding tells an intact file, so corrupt gzip data ends the count quietly
    (the decoder names the file and the line). About one decompression of the file."""
    newlines = peers = 0
    tail = b""
    try:
        with gzip.open(Path(path), "rb") as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                newlines += chunk.count(b"\n")
                # The tail of the previous chunk is shorter than the tag: nothing is counted twice.
                peers += (tail + chunk).count(_PEER_TAG)
                tail = chunk[-(len(_PEER_TAG) - 1) :]
    except (gzip.BadGzipFile, EOFError, zlib.error):
        pass
    return max(newlines - 2, 0), peers


async def read_snapshot(path: Path) -> Snapshot:
    """Read and validate a snapshot file on a worker thread; ``SnapshotError`` names file and line."""
    return await asyncio.to_thread(_read, Path(path))


#: How far ahead of "now" a snapshot's name may lie and still count as the newest: further, it was
#: named by a clock that was ahead and has since been set back (the tracker's ``max_clock_skew_s``).
AHEAD_S = 120.0


def _latest(directory: Path, node: str | None, now: float | None, ahead_s: float) -> Path | None:
    try:
        found = [(millis, path) for millis, owner, path in _snapshots(directory) if node in (None, owner)]
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SnapshotFileError.of(error) from error
    if now is not None:  # files named ahead of now rank below every other, newest first among them
        limit = (now + ahead_s) * 1000
        found = [f for f in found if f[0] > limit] + [f for f in found if f[0] <= limit]
    return found[-1][1] if found else None


async def latest_snapshot(
    directory: Path, node: str | None = None, *, now: float | None = None, ahead_s: float = AHEAD_S
) -> Path | None:
    """The newest snapshot file in ``directory`` (of ``node`` if given), or ``None`` if there is none.

    Newest by the time in its name. Given ``now``, a name more than ``ahead_s`` after it ranks below
    every other: a clock that ran ahead named it, and the files written since the clock was set
    right, named earlier, hold the later state (QA round 7: the stale file stayed "the newest" for
    the size of the step).
    """
    return await asyncio.to_thread(_latest, Path(directory), node, now, ahead_s)


def taken_at(path: Path) -> float:
    """When the snapshot at ``path`` was taken, read from its name (to the millisecond)."""
    match = _FILE_NAME.fullmatch(Path(path).name)
    if match is None:
        raise SnapshotError(f"{Path(path).name!r} is not a snapshot file name")
    return int(match[1]) / 1000
