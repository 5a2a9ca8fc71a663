"""The gossip state snapshot: exact round trips, a decoder that only raises SnapshotError, atomic files."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import itertools
import json
import math
import os
import re
import string
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.errors import InvalidInput
from tracker.gossip import snapshot
from tracker.gossip.files import (
    STALE_TEMP_S,
    latest_snapshot,
    read_snapshot,
    snapshot_name,
    write_snapshot,
)
from tracker.gossip.snapshot import (
    FORMAT,
    MAX_LINE_BYTES,
    MappingRecord,
    PeerRecord,
    Record,
    SampleRecord,
    Snapshot,
    SnapshotError,
    SnapshotHeader,
    decode,
    encode,
    iter_decode,
)

T0 = 1_700_000_000.25

# -- strategies -------------------------------------------------------------------------------

# Exactly what validate_id allows: no C0/C1 controls or DEL (category Cc), no lone surrogates (Cs).
id_chars = st.characters(exclude_categories=("Cc", "Cs"))
ids = st.text(id_chars, min_size=1, max_size=256)
node_keys = st.text(id_chars, min_size=1, max_size=64)
file_node_keys = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=64)
numbers = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)  # subnormals up to float max
maybe_numbers = st.none() | numbers
counters = st.integers(0, snapshot.MAX_COUNTER)

peer_records = st.builds(
    PeerRecord,
    origin=node_keys,
    peer=ids,
    first_seen=numbers,
    online=st.booleans(),
    online_since=maybe_numbers,
    last_seen=numbers,
    uptime_s=numbers,
    served=counters,
    failed=counters,
    success_weight=numbers,
    failure_weight=numbers,
    evidence_at=maybe_numbers,
    speed_bps=maybe_numbers,
    updated_at=numbers,
)
sample_records = st.builds(
    SampleRecord, origin=node_keys, peer=ids, at=numbers, bytes_per_sec=st.integers(0, 10**12)
)
mapping_records = st.builds(
    MappingRecord,
    origin=node_keys,
    cid=ids,
    peer=ids,
    available=st.booleans(),
    since=numbers,
    last_confirmed=numbers,
    changed_at=numbers,
)
records_lists = st.lists(st.one_of(peer_records, sample_records, mapping_records), max_size=8)
headers = st.builds(SnapshotHeader, node=node_keys, taken_at=numbers)
file_headers = st.builds(SnapshotHeader, node=file_node_keys, taken_at=st.floats(0, 1e12, exclude_max=True))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(exclude_categories=()), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _expected(header: SnapshotHeader, records: list[Record]) -> Snapshot:
    return Snapshot(
        header=header,
        peers=tuple(r for r in records if isinstance(r, PeerRecord)),
        samples=tuple(r for r in records if isinstance(r, SampleRecord)),
        mappings=tuple(r for r in records if isinstance(r, MappingRecord)),
    )


def _split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(points)]


def _header(node: str = "node-a", taken_at: float = T0) -> SnapshotHeader:
    return SnapshotHeader(node=node, taken_at=taken_at)


def _sample(i: int) -> SampleRecord:
    return SampleRecord(origin="node-a", peer=f"peer-{i:05d}", at=T0 + i, bytes_per_sec=1_000_000 + i)


def _decodes_or_rejects(chunks: list[bytes]) -> None:
    """The decoder's contract under fuzzing: a Snapshot, or SnapshotError; anything else fails the test."""
    try:
        result = decode(chunks)
    except SnapshotError:
        return
    assert decode(encode(result.header, [*result.peers, *result.samples, *result.mappings])) == result


# -- round trips ------------------------------------------------------------------------------


@given(headers, records_lists, st.data())
def test_encode_then_decode_gives_equal_objects_however_the_bytes_are_chunked(
    header: SnapshotHeader, records: list[Record], data: st.DataObject
) -> None:
    blob = b"".join(encode(header, records))
    chunks = _split(blob, data.draw(st.lists(st.integers(0, len(blob)), max_size=6)))
    assert decode(chunks) == _expected(header, records)
    assert list(iter_decode(chunks)) == [header, *records]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file_headers, records_lists)
async def test_write_then_read_gives_equal_objects(
    tmp_path: Path, header: SnapshotHeader, records: list[Record]
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        path = await write_snapshot(Path(directory), header, records, keep=1)
        assert path.name == snapshot_name(header)
        assert await read_snapshot(path) == _expected(header, records)


@pytest.mark.parametrize(
    "value", [0.0, 5e-324, 2.2250738585072014e-308, 0.1 + 0.2, 1e16 + 2, 1.7976931348623157e308]
)
def test_floats_come_back_bit_for_bit(value: float) -> None:
    sample = SampleRecord(origin="n", peer="p", at=value, bytes_per_sec=0)
    (decoded,) = decode(encode(_header(), [sample])).samples
    assert struct.pack("<d", decoded.at) == struct.pack("<d", value)


def test_encode_streams_line_by_line_and_never_materializes_the_records() -> None:
    endless = itertools.repeat(_sample(1))
    first, second, third = itertools.islice(encode(_header(), endless), 3)
    assert json.loads(first) == {"format": FORMAT, "version": 1, "node": "node-a", "taken_at": T0}
    assert second == third and json.loads(second)["t"] == "sample"


def test_the_documented_wire_format_is_the_encoded_one() -> None:
    peer = PeerRecord(
        origin="node-a", peer="p", first_seen=1, online=True, online_since=2, last_seen=3, uptime_s=4,
        served=5, failed=6, success_weight=0.5, failure_weight=0.25, evidence_at=None, speed_bps=None,
        updated_at=7,
    )  # fmt: skip
    lines = [json.loads(line) for line in encode(_header(), [peer, _sample(1)])]
    assert lines[1] == {"t": "peer", **dataclasses.asdict(peer)}
    assert lines[-1] == {"t": "end", "peers": 1, "samples": 1, "mappings": 0}
    assert isinstance(lines[1]["first_seen"], float), "ints given for times are normalized to floats"
    doc = snapshot.__doc__ or ""
    for cls in (PeerRecord, SampleRecord, MappingRecord, SnapshotHeader):
        for field in dataclasses.fields(cls):
            assert f"``{field.name}``" in doc or f'"{field.name}"' in doc, f"{cls.__name__}.{field.name}"


# -- validation on the way in and out -----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("at", math.nan), ("at", math.inf), ("at", -1.0), ("at", True), ("at", "1"), ("at", 10**400),
     ("bytes_per_sec", True), ("bytes_per_sec", 1.0), ("bytes_per_sec", -1), ("bytes_per_sec", 10**13),
     ("peer", ""), ("peer", "a\nb"), ("peer", "x" * 257), ("origin", "n" * 65), ("origin", None)],
)  # fmt: skip
def test_records_cannot_be_built_invalid(field: str, value: object) -> None:
    with pytest.raises(InvalidInput, match=field):
        SampleRecord(**{**dataclasses.asdict(_sample(1)), field: value})


def test_a_nan_forced_into_a_record_is_refused_on_encode() -> None:
    sample = _sample(1)
    object.__setattr__(sample, "at", math.nan)
    with pytest.raises(SnapshotError, match="record #1"):
        list(encode(_header(), [sample]))


def test_only_records_can_be_encoded() -> None:
    with pytest.raises(SnapshotError, match="record #2 is a dict"):
        list(encode(_header(), [_sample(1), {"t": "sample"}]))  # type: ignore[list-item]


# The valid snapshot each malformed case below breaks in one place, as JSON objects.
HEADER = {"format": FORMAT, "version": 1, "node": "node-a", "taken_at": T0}
PEER = {"t": "peer", "origin": "node-a", "peer": "p1", "first_seen": T0, "online": True, "online_since": T0,
        "last_seen": T0 + 5, "uptime_s": 0.0, "served": 3, "failed": 1, "success_weight": 1.5,
        "failure_weight": 0.5, "evidence_at": T0, "speed_bps": 2e6, "updated_at": T0 + 5}  # fmt: skip
SAMPLE = {"t": "sample", **dataclasses.asdict(_sample(1))}
MAPPING = {"t": "mapping", "origin": "node-a", "cid": "c1", "peer": "p1", "available": True,
           "since": T0, "last_confirmed": T0, "changed_at": T0}  # fmt: skip
END = {"t": "end", "peers": 1, "samples": 1, "mappings": 1}
VALID = [HEADER, PEER, SAMPLE, MAPPING, END]  # lines 1..5


def _lines(*objs: dict[str, Any] | bytes) -> list[bytes]:
    return [o if isinstance(o, bytes) else json.dumps(o).encode() + b"\n" for o in objs]


def _at(line: int, new: dict[str, Any] | bytes, *, insert: bool = False) -> list[bytes]:
    """The valid snapshot with its line ``line`` replaced by (or preceded by) ``new``."""
    lines = _lines(*VALID)
    lines[line - 1 : line - 1 if insert else line] = _lines(new)
    return lines


def _with(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**obj, **changes}


def _without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


def _raw(obj: dict[str, Any], old: str, new: str) -> bytes:
    text = json.dumps(obj)
    assert old in text
    return text.replace(old, new, 1).encode() + b"\n"


MALFORMED: list[tuple[str, list[bytes], int, str]] = [
    ("empty input", [], 1, "empty"),
    ("another format", _at(1, _with(HEADER, format="other")), 1, "not a peer-tracker-state"),
    ("future version", _at(1, _with(HEADER, version=2)), 1, "newer"),
    ("version zero", _at(1, _with(HEADER, version=0)), 1, "unknown snapshot version 0"),
    ("version as a string", _at(1, _with(HEADER, version="1")), 1, "version '1'"),
    ("version as a bool", _at(1, _with(HEADER, version=True)), 1, "version True"),
    ("missing header", _lines(*VALID[1:]), 1, "header is missing"),
    ("header without node", _at(1, _without(HEADER, "node")), 1, "lacks field(s) node"),
    ("header with an extra field", _at(1, _with(HEADER, x=1)), 1, "unknown field(s) 'x'"),
    ("header with an empty node", _at(1, _with(HEADER, node="")), 1, "node must not be empty"),
    ("header taken_at as string", _at(1, _with(HEADER, taken_at="now")), 1, "taken_at"),
    ("missing trailer", _lines(*VALID[:-1]), 5, "truncated"),
    ("cut mid-line", [b"".join(_lines(*VALID))[:-60]], 4, "not JSON"),
    ("trailer count mismatch", _at(5, _with(END, peers=2)), 5, "counts 2 peers, found 1"),
    ("trailer negative count", _at(5, _with(END, samples=-1)), 5, "samples is not a count"),
    ("trailer bool count", _at(5, _with(END, mappings=True)), 5, "mappings is not a count"),
    ("trailer missing a count", _at(5, _without(END, "peers")), 5, "lacks field(s) peers"),
    ("trailer extra field", _at(5, _with(END, more=0)), 5, "unknown field(s) 'more'"),
    ("data after the trailer", _lines(*VALID, SAMPLE), 6, "after the end trailer"),
    ("blank line after the trailer", [*_lines(*VALID), b"\n"], 6, "after the end trailer"),
    ("unknown record type", _at(2, _with(PEER, t="bogus")), 2, "unknown record type 'bogus'"),
    ("record without a type", _at(2, _without(PEER, "t")), 2, "unknown record type None"),
    ("missing field", _at(2, _without(PEER, "served")), 2, "lacks field(s) served"),
    ("extra field", _at(2, _with(PEER, colour="red")), 2, "unknown field(s) 'colour'"),
    ("string for a time", _at(2, _with(PEER, first_seen="today")), 2, "first_seen must be a number"),
    ("bool for an int", _at(2, _with(PEER, served=True)), 2, "served must be an integer"),
    ("float for an int", _at(2, _with(PEER, failed=1.0)), 2, "failed must be an integer"),
    ("int for a bool", _at(2, _with(PEER, online=1)), 2, "online must be true or false"),
    ("null for a required time", _at(2, _with(PEER, last_seen=None)), 2, "last_seen must be a number"),
    ("negative count", _at(2, _with(PEER, failed=-1)), 2, "failed must be an integer within"),
    ("negative time", _at(3, _with(SAMPLE, at=-0.5)), 3, "at must be a finite number >= 0"),
    ("speed over the limit", _at(3, _with(SAMPLE, bytes_per_sec=10**13)), 3, "bytes_per_sec"),
    ("counter beyond bigint", _at(2, _with(PEER, served=2**63)), 2, "served"),
    ("empty peer id", _at(2, _with(PEER, peer="")), 2, "peer must not be empty"),
    ("control character in a cid", _at(4, _with(MAPPING, cid="a\x00b")), 4, "control character"),
    ("lone surrogate in an id", _at(4, _with(MAPPING, peer="\ud800")), 4, "lone surrogate"),
    ("id too long", _at(4, _with(MAPPING, cid="c" * 257)), 4, "257 characters"),
    ("node key too long", _at(2, _with(PEER, origin="n" * 65)), 2, "origin is longer"),
    ("NaN", _at(2, _raw(PEER, "2000000.0", "NaN")), 2, "NaN is not a finite number"),
    ("Infinity", _at(3, _raw(SAMPLE, "1700000001.25", "Infinity")), 3, "Infinity is not"),
    ("-Infinity", _at(2, _raw(PEER, "2000000.0", "-Infinity")), 2, "-Infinity is not"),
    ("overflowing float", _at(2, _raw(PEER, "2000000.0", "1e400")), 2, "speed_bps"),
    ("integer beyond float range", _at(2, _with(PEER, uptime_s=10**400)), 2, "uptime_s"),
    ("integer of 5000 digits", _at(2, _raw(PEER, '"served": 3', '"served": ' + "7" * 5000)), 2, "digits"),
    ("duplicate key", _at(2, _raw(PEER, '"served": 3', '"served": 3, "served": 4')), 2, "duplicate key"),
    ("line over the limit", _at(3, b" " * (MAX_LINE_BYTES + 1) + b"\n"), 3, "limit"),
    ("unterminated line over the limit", [*_lines(*VALID[:2]), b"x" * (MAX_LINE_BYTES + 1)], 3, "limit"),
    ("not UTF-8", _at(4, b'{"t": "\xff"}\n'), 4, "not UTF-8"),
    ("UTF-16", ["".join(json.dumps(o) + "\n" for o in VALID).encode("utf-16")], 1, "not UTF-8"),
    ("not JSON", _at(3, b"{oops\n"), 3, "not JSON"),
    ("a JSON array", _at(3, b"[1, 2]\n"), 3, "expected a JSON object, got list"),
    ("absurd nesting", _at(3, b"[" * 60_000 + b"\n"), 3, "JSON"),
    ("empty line", _at(3, b"\n", insert=True), 3, "empty line"),
    ("a str instead of bytes", ["{}"], 1, "expected bytes, got str"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("lines", "line", "what"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_snapshot_is_rejected_naming_the_line(lines: list[bytes], line: int, what: str) -> None:
    with pytest.raises(SnapshotError) as caught:
        list(iter_decode(lines))
    assert (
        str(caught.value).startswith(f"line {line}: ")
        and len(re.findall(r"\bline \d", str(caught.value))) == 1
    )
    assert what in str(caught.value)
    with pytest.raises(SnapshotError):
        decode(lines)


def test_the_valid_base_of_the_malformed_cases_decodes() -> None:
    assert decode(_lines(*VALID)).peers[0].peer == "p1"


def test_iter_decode_yields_records_before_it_notices_truncation() -> None:
    stream = iter_decode(_lines(*VALID[:-1]))
    assert isinstance(next(stream), SnapshotHeader)
    assert [type(r) for r in itertools.islice(stream, 3)] == [PeerRecord, SampleRecord, MappingRecord]
    with pytest.raises(SnapshotError, match="line 5: the end trailer is missing"):
        next(stream)


# -- fuzzing: the decoder only ever raises SnapshotError (and promptly; hypothesis's deadline) --------

fuzz = settings(max_examples=300, deadline=timedelta(seconds=2))


@fuzz
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_only_ever_raise_snapshot_error(chunks: list[bytes]) -> None:
    _decodes_or_rejects(chunks)


record_keys = sorted(
    {f.name for cls in (PeerRecord, SampleRecord, MappingRecord) for f in dataclasses.fields(cls)}
)
json_objects = st.dictionaries(
    st.sampled_from(
        ["t", *record_keys, "peers", "samples", "mappings", "format", "version", "node", "taken_at"]
    )
    | st.text(max_size=4),
    st.sampled_from(["peer", "sample", "mapping", "end", FORMAT, 1, 0, -1]) | json_values,
    max_size=16,
)


@fuzz
@given(st.booleans(), st.lists(json_values | json_objects, max_size=6), st.booleans())
def test_random_json_lines_only_ever_raise_snapshot_error(
    valid_header: bool, objs: list[object], ascii_only: bool
) -> None:
    lines = [json.dumps(o, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n" for o in objs]
    _decodes_or_rejects(_lines(HEADER) + lines if valid_header else lines)


@fuzz
@given(headers, records_lists, st.data())
def test_mutated_valid_snapshots_only_ever_raise_snapshot_error(
    header: SnapshotHeader, records: list[Record], data: st.DataObject
) -> None:
    lines = list(encode(header, records))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        kind = data.draw(st.sampled_from(["field", "drop", "duplicate", "swap", "bytes"]))
        if kind == "field":
            try:
                obj = json.loads(lines[i])
            except ValueError:  # an earlier byte mutation broke it already
                continue
            if not isinstance(obj, dict):
                continue
            key = data.draw(st.sampled_from([*obj, "extra"]))
            if data.draw(st.booleans()):
                obj.pop(key, None)
            else:
                obj[key] = data.draw(json_values)
            lines[i] = json.dumps(obj).encode() + b"\n"
        elif kind == "drop":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            blob = bytearray(lines[i])
            at = data.draw(st.integers(0, len(blob)))
            blob[at : at + data.draw(st.integers(0, 4))] = data.draw(st.binary(max_size=4))
            lines[i] = bytes(blob)
        if not lines:
            break
    _decodes_or_rejects(lines)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records_lists, st.data())
async def test_corrupted_gzip_files_only_ever_raise_snapshot_error(
    tmp_path: Path, records: list[Record], data: st.DataObject
) -> None:
    blob = bytearray(gzip.compress(b"".join(encode(_header(), records))))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at : at + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3))
    with tempfile.NamedTemporaryFile(dir=tmp_path, suffix=".jsonl.gz", delete=False) as file:
        file.write(blob)
    try:
        await read_snapshot(Path(file.name))
    except SnapshotError as error:
        assert Path(file.name).name in str(error) and "line " in str(error)


async def test_a_truncated_gzip_file_is_rejected_naming_the_file(tmp_path: Path) -> None:
    path = await write_snapshot(tmp_path, _header(), [_sample(i) for i in range(100)], keep=1)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(SnapshotError, match=rf"{path.name}: line \d+ or later: corrupt gzip data"):
        await read_snapshot(path)


# -- files: atomic writes, cancellation, retention ----------------------------------------------


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _temps(directory: Path) -> list[str]:
    return [name for name in _listing(directory) if name.startswith(".") and name.endswith(".tmp")]


async def test_a_snapshot_being_written_is_invisible_and_the_previous_one_stays_intact(
    tmp_path: Path,
) -> None:
    older = await write_snapshot(tmp_path, _header(taken_at=T0), [_sample(0)], keep=5)
    older_bytes = older.read_bytes()
    newer = _header(taken_at=T0 + 60)
    final = tmp_path / snapshot_name(newer)
    checked: list[bool] = []

    async def records() -> AsyncIterator[Record]:
        for i in range(8000):  # several 256 KiB chunks, so the temp file has data when we look
            if i == 6000:
                assert _listing(tmp_path) == sorted([older.name, *_temps(tmp_path)])
                assert not final.exists() and len(_temps(tmp_path)) == 1
                assert (tmp_path / _temps(tmp_path)[0]).stat().st_size > 0, "written as it goes"
                assert older.read_bytes() == older_bytes
                assert (await read_snapshot(older)).samples == (_sample(0),)
                assert await latest_snapshot(tmp_path) == older
                checked.append(True)
            yield _sample(i)

    assert await write_snapshot(tmp_path, newer, records(), keep=5) == final
    assert checked and _listing(tmp_path) == sorted([older.name, final.name])
    assert (await read_snapshot(final)).samples == tuple(_sample(i) for i in range(8000))


async def test_a_write_cancelled_midway_leaves_no_temp_file_and_no_new_snapshot(tmp_path: Path) -> None:
    older = await write_snapshot(tmp_path, _header(taken_at=T0), [], keep=5)
    older_bytes = older.read_bytes()
    paused, resume, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def records() -> AsyncIterator[Record]:
        try:
            for i in range(6000):
                yield _sample(i)
            paused.set()
            await resume.wait()  # the test cancels the writer here
            yield _sample(6000)
        finally:
            closed.set()

    task = asyncio.create_task(write_snapshot(tmp_path, _header(taken_at=T0 + 60), records(), keep=5))
    await paused.wait()
    assert len(_temps(tmp_path)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _listing(tmp_path) == [older.name]
    assert older.read_bytes() == older_bytes
    assert closed.is_set()


async def test_a_killed_writers_stale_temp_files_are_removed_by_the_next_write_of_that_node(
    tmp_path: Path,
) -> None:
    """A SIGKILL mid-write leaves a temp file nothing would ever remove; the node's next snapshot
    removes its own stale ones, and leaves fresh ones (a concurrent write) and other nodes' alone."""
    stale = tmp_path / f".{snapshot_name(_header(taken_at=T0 - 7200))}.0123456789ab.tmp"
    fresh = tmp_path / f".{snapshot_name(_header(taken_at=T0 - 60))}.00000000000f.tmp"
    foreign = tmp_path / f".{snapshot_name(_header('node-b', taken_at=T0 - 7200))}.0123456789ab.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for path in (stale, fresh, foreign, unrelated):
        path.write_bytes(b"partial")
    now = os.stat(tmp_path).st_mtime
    for path in (stale, foreign, unrelated):
        os.utime(path, (now - STALE_TEMP_S - 60, now - STALE_TEMP_S - 60))

    written = await write_snapshot(tmp_path, _header(taken_at=T0), [_sample(0)], keep=5)

    assert _listing(tmp_path) == sorted([written.name, fresh.name, foreign.name, unrelated.name])


@pytest.mark.parametrize("failure", ["records raise", "not a record"])
async def test_a_write_that_fails_midway_leaves_nothing_behind(tmp_path: Path, failure: str) -> None:
    async def records() -> AsyncIterator[Any]:
        for i in range(5000):
            yield _sample(i)
        if failure == "records raise":
            raise RuntimeError("the database went away")
        yield object()

    with pytest.raises(RuntimeError if failure == "records raise" else SnapshotError):
        await write_snapshot(tmp_path, _header(), records(), keep=5)
    assert _listing(tmp_path) == []


async def test_keep_k_keeps_exactly_the_newest_k_of_this_node_and_touches_nothing_else(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".someone-else.tmp").write_text("theirs")
    (tmp_path / "snapshot-1-node-a.jsonl.gz").write_text("not our name pattern")
    other_node = await write_snapshot(tmp_path, _header(node="node-b", taken_at=T0), [], keep=1)
    for offset in range(1, 7):
        await write_snapshot(tmp_path, _header(taken_at=T0 + offset), [_sample(offset)], keep=3)
    assert _listing(tmp_path) == sorted(
        [".someone-else.tmp", "notes.txt", "snapshot-1-node-a.jsonl.gz", other_node.name]
        + [snapshot_name(_header(taken_at=T0 + offset)) for offset in (4, 5, 6)]
    )


async def test_after_the_clock_went_back_the_files_named_ahead_are_the_oldest(tmp_path: Path) -> None:
    """Named by a clock a day ahead, then set right: the files written since hold the later state.
    Retention dropped those instead and latest_snapshot went on naming a stale file for a day (QA
    round 7); files named ahead now go first, and rank below the others given ``now``."""
    day = 86_400
    ahead = [await write_snapshot(tmp_path, _header(taken_at=T0 + day + i), [], keep=3) for i in (1, 2)]
    assert await latest_snapshot(tmp_path, now=T0) == ahead[1]  # nothing else to choose
    since = [await write_snapshot(tmp_path, _header(taken_at=T0 + i), [], keep=3) for i in (1, 2)]
    assert [p.exists() for p in ahead + since] == [False, True, True, True]
    assert await latest_snapshot(tmp_path, now=T0 + 3) == since[1]
    assert await latest_snapshot(tmp_path) == ahead[1]  # without now, by name alone
    await write_snapshot(tmp_path, _header(taken_at=T0 + 3), [], keep=3)
    assert not ahead[1].exists()


async def test_latest_snapshot_is_the_newest_by_time_optionally_of_one_node(tmp_path: Path) -> None:
    assert await latest_snapshot(tmp_path / "missing") is None
    assert await latest_snapshot(tmp_path) is None
    a = await write_snapshot(tmp_path, _header(node="node-a", taken_at=T0 + 1), [], keep=5)
    b = await write_snapshot(tmp_path, _header(node="node-b", taken_at=T0), [], keep=5)
    assert await latest_snapshot(tmp_path) == a
    assert await latest_snapshot(tmp_path, node="node-b") == b
    assert await latest_snapshot(tmp_path, node="node-c") is None


async def test_write_snapshot_creates_the_directory_and_names_the_file_by_time_and_node(
    tmp_path: Path,
) -> None:
    path = await write_snapshot(tmp_path / "a" / "b", _header(taken_at=1.5), [], keep=1)
    assert path == tmp_path / "a" / "b" / "snapshot-000000000001500-node-a.jsonl.gz"
    with gzip.open(path) as file:
        assert file.read().count(b"\n") == 2


@pytest.mark.parametrize(
    ("header", "keep", "error"),
    [
        (_header(node="../escape"), 1, SnapshotError),
        (_header(node="a b"), 1, SnapshotError),
        (_header(taken_at=1e12), 1, SnapshotError),
        (_header(), 0, InvalidInput),
        (_header(), True, InvalidInput),
    ],
)
async def test_write_snapshot_refuses_unusable_names_and_keep_counts_before_touching_disk(
    tmp_path: Path, header: SnapshotHeader, keep: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await write_snapshot(tmp_path / "snapshots", header, [], keep=keep)
    assert not (tmp_path / "snapshots").exists()


def test_headers_hold_only_the_current_format_and_version() -> None:
    with pytest.raises(InvalidInput, match="version"):
        SnapshotHeader(node="n", taken_at=0.0, version=2)
    with pytest.raises(InvalidInput, match="format"):
        SnapshotHeader(node="n", taken_at=0.0, format="other")


def _sync_records() -> Iterator[Record]:
    yield _sample(1)


async def test_write_snapshot_accepts_plain_iterables_too(tmp_path: Path) -> None:
    path = await write_snapshot(tmp_path, _header(), _sync_records(), keep=1)
    assert (await read_snapshot(path)).samples == (_sample(1),)
