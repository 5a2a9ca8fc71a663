"""The gossip state snapshot: one tracker's whole gossip state as a versioned, self-checking stream.

The sweeper writes one to disk at most once per ``snapshot_interval_s`` (``write_snapshot``); gossip
sends the same lines as its full-state form. Everything is named by external keys (node, peer and
content ids) because surrogate ids mean nothing outside one database. Pure: no SQL here; the
sweeper's query produces the records.

Format ``peer-tracker-state``, version 1: JSON Lines, UTF-8, one JSON object per line, each ending in
``\\n``. Times are Unix seconds (UTC), durations seconds, speeds bytes per second; every number is
finite and >= 0 (NaN and Infinity are refused both ways). Floats are written as Python's shortest
round-trip repr, so they read back bit for bit. Node keys are 1-64 characters, peer ids and cids
1-256, never with control characters.

1. Header: ``{"format": "peer-tracker-state", "version": 1, "node": N, "taken_at": T}``: ``node`` is the
   exporting tracker's node_key, ``taken_at`` the time of the export.
2. Records, tagged by ``"t"``, in any order; ``origin`` is always the node_key of the observer.

   ``"t": "peer"``: one origin's view of one peer (a ``peer_stats`` row plus ``peers.first_seen``):
   ``peer`` the peer id; ``first_seen`` when the exporting database first saw it; ``online`` (bool)
   the state of the latest presence event; ``online_since`` start of the open session, or of the
   one the sweeper closed, or null; ``last_seen`` latest event time; ``uptime_s`` seconds of closed
   sessions; ``served``, ``failed`` exact lifetime upload counts (integers); ``success_weight``,
   ``failure_weight`` decayed evidence (dimensionless) as of ``evidence_at``, the newest outcome's
   time (null before any); ``speed_bps`` mean of the latest samples in bytes/s, or null;
   ``updated_at`` when the origin last wrote the row.

   ``"t": "sample"``: a bandwidth sample (the exporter sends each peer and origin's latest window):
   ``peer``; ``at`` when it was measured; ``bytes_per_sec`` (integer, at most 10^12).

   ``"t": "mapping"``: whether a peer holds a content, removals (tombstones) included; ``origin``
   made the deciding change: ``cid``; ``peer``; ``available`` (bool); ``since`` when it last became
   available; ``last_confirmed`` the latest announcement; ``changed_at`` the latest event time for
   the pair, which decides last-writer-wins.
3. Trailer: ``{"t": "end", "peers": P, "samples": S, "mappings": M}``, the record counts, so that a
   truncated file (or one that lost or gained lines) is detected.

A reader rejects anything else with ``SnapshotError`` naming the line: another format, an unknown or
newer version, a missing header or trailer, an unknown record type, missing, extra, duplicate or
wrongly typed fields (``true`` is not an integer), invalid ids, negative numbers, lines over 64 KiB.
Files on disk are gzip-compressed, named ``snapshot-<taken_at in ms, 15 digits>-<node>.jsonl.gz``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from ..errors import InvalidInput
from ..events import MAX_BYTES_PER_SEC, validate_id
from .protocol import MAX_COUNTER

FORMAT = "peer-tracker-state"
VERSION = 1
MAX_LINE_BYTES = 64 * 1024
MAX_NODE_KEY_LENGTH = 64  # tracker_nodes.node_key is varchar(64)


class SnapshotError(InvalidInput):
    """A snapshot is malformed, truncated, or of a format or version this tracker does not read."""


Check = Callable[[object, str], Any]  # (value, field name) -> the value, normalized


def _show(value: object) -> str:
    """A repr short enough for an error message (an input line may be 64 KiB)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def _node(value: object, name: str) -> str:
    if len(key := validate_id(value, name)) > MAX_NODE_KEY_LENGTH:
        raise InvalidInput(f"{name} is longer than the {MAX_NODE_KEY_LENGTH} characters of a node key")
    return key


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (events.validate_time raises this one as is)
        number = math.inf
    if not (math.isfinite(number) and number >= 0):
        raise InvalidInput(f"{name} must be a finite number >= 0, got {_show(value)}")
    return number


def _integer(maximum: int) -> Check:
    def check(value: object, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise InvalidInput(f"{name} must be an integer within 0..{maximum}, got {_show(value)}")
        return value

    return check


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {_show(value)}")
    return value


# A field's check follows from its annotation, except where its name says more.
_BY_TYPE: dict[str, Check] = {
    "str": validate_id,
    "float": _number,
    "float | None": lambda value, name: None if value is None else _number(value, name),
    "int": _integer(MAX_COUNTER),
    "bool": _flag,
}
_BY_NAME: dict[str, Check] = {"origin": _node, "node": _node, "bytes_per_sec": _integer(MAX_BYTES_PER_SEC)}
_CHECKS: dict[type, dict[str, Check]] = {}  # per class: field -> check, in wire order; filled below


def _validate(obj: object) -> None:
    """Check every field and store its normalized value (an int given for a float becomes a float)."""
    for name, check in _CHECKS[type(obj)].items():
        object.__setattr__(obj, name, check(getattr(obj, name), name))


R = TypeVar("R", bound="_Record")


def trusted(cls: type[R], /, **values: Any) -> R:
    """A record built from the tracker's own rows, which were checked when they were written: not
    checked again. On export the checks were a third of the CPU of a pass that keeps the event loop
    busy (QA round 20); encoding still refuses NaN, and every reader checks what it reads."""
    record = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(record, name, value)
    return record


@dataclass(frozen=True, slots=True, kw_only=True)
class _Record:
    """Records validate themselves like events do: none is encoded invalid or decoded unchecked."""

    TAG: ClassVar[str]

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecord(_Record):
    """One origin's view of one peer: a ``peer_stats`` row plus the peer's ``first_seen``."""

    TAG: ClassVar[str] = "peer"
    origin: str
    peer: str
    first_seen: float
    online: bool
    online_since: float | None
    last_seen: float
    uptime_s: float
    served: int
    failed: int
    success_weight: float
    failure_weight: float
    evidence_at: float | None
    speed_bps: float | None
    updated_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleRecord(_Record):
    """One bandwidth sample of one peer, as measured by one origin."""

    TAG: ClassVar[str] = "sample"
    origin: str
    peer: str
    at: float
    bytes_per_sec: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingRecord(_Record):
    """Whether ``peer`` holds ``cid``; ``available=False`` is a tombstone, which must spread too."""

    TAG: ClassVar[str] = "mapping"
    origin: str
    cid: str
    peer: str
    available: bool
    since: float
    last_confirmed: float
    changed_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotHeader:
    """Who exported the snapshot and when; this module writes and holds only the current version."""

    format: str = FORMAT
    version: int = VERSION
    node: str
    taken_at: float

    def __post_init__(self) -> None:
        if self.format != FORMAT or isinstance(self.version, bool) or self.version != VERSION:
            got = f"format {_show(self.format)} version {_show(self.version)}"
            raise InvalidInput(f"a header holds format {FORMAT!r} version {VERSION}, got {got}")
        _validate(self)


Record = PeerRecord | SampleRecord | MappingRecord
_TYPES: dict[str, type[Record]] = {cls.TAG: cls for cls in (PeerRecord, SampleRecord, MappingRecord)}
_COUNT_KEYS = {"peer": "peers", "sample": "samples", "mapping": "mappings"}  # the trailer's names
for _cls in (*_TYPES.values(), SnapshotHeader):
    _CHECKS[_cls] = {f.name: _BY_NAME.get(f.name) or _BY_TYPE[str(f.type)] for f in fields(_cls)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """A whole decoded snapshot, records grouped by type in file order."""

    header: SnapshotHeader
    peers: tuple[PeerRecord, ...] = ()
    samples: tuple[SampleRecord, ...] = ()
    mappings: tuple[MappingRecord, ...] = ()


# -- encoding -----------------------------------------------------------------------------------

_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":"))


def _dump(obj: object, what: str, tag: dict[str, str] | None = None) -> bytes:
    values = {**(tag or {}), **{name: getattr(obj, name) for name in _CHECKS[type(obj)]}}
    try:
        return (_JSON.encode(values) + "\n").encode()
    except ValueError as error:  # NaN or a lone surrogate forced in past validation
        raise SnapshotError(f"cannot encode {what}: {error}") from error


class _Lines:
    """Encodes one snapshot line by line, counting the records for the trailer."""

    def __init__(self, header: SnapshotHeader) -> None:
        if not isinstance(header, SnapshotHeader):
            raise TypeError(f"header must be a SnapshotHeader, got {type(header).__name__}")
        self.header = _dump(header, "the header")
        self.counts = dict.fromkeys(_TYPES, 0)

    def record(self, record: object) -> bytes:
        number = sum(self.counts.values()) + 1
        if not isinstance(record, _Record):
            raise SnapshotError(f"record #{number} is a {type(record).__name__}, not a snapshot record")
        self.counts[record.TAG] += 1
        return _dump(record, f"record #{number}", {"t": record.TAG})

    def trailer(self) -> bytes:
        counts = {_COUNT_KEYS[tag]: n for tag, n in self.counts.items()}
        return (_JSON.encode({"t": "end", **counts}) + "\n").encode()


def encode(header: SnapshotHeader, records: Iterable[Record]) -> Iterator[bytes]:
    """Yield the snapshot a line (bytes ending in ``\\n``) at a time, never holding the whole file.

    >>> next(encode(SnapshotHeader(node="n1", taken_at=1.5), []))
    b'{"format":"peer-tracker-state","version":1,"node":"n1","taken_at":1.5}\\n'
    """
    lines = _Lines(header)
    yield lines.header
    for record in records:
        yield lines.record(record)
    yield lines.trailer()


# -- decoding -----------------------------------------------------------------------------------


def _numbered_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Split lines or any chunking of the bytes into numbered lines, buffering at most the limit."""
    buffer, number = bytearray(), 0
    for chunk in chunks:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise SnapshotError(f"line {number + 1}: expected bytes, got {type(chunk).__name__}")
        start, scan = 0, len(buffer)
        buffer += chunk
        while (end := buffer.find(b"\n", scan)) >= 0:
            number += 1
            if end - start > MAX_LINE_BYTES:
                raise SnapshotError(f"line {number}: longer than the {MAX_LINE_BYTES}-byte limit")
            yield number, bytes(buffer[start:end])
            start = scan = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE_BYTES:
            raise SnapshotError(f"line {number + 1}: longer than the {MAX_LINE_BYTES}-byte limit")
    if buffer:  # a last line without its newline; whether anything is missing is the trailer's call
        yield number + 1, bytes(buffer)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys, which plain ``json`` resolves silently (the last one wins)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_show(key)}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _parse(number: int, raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise SnapshotError(f"line {number}: empty line")
    try:
        obj = json.loads(raw.decode(), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as error:
        raise SnapshotError(f"line {number}: not UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise SnapshotError(f"line {number}: not JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # our hooks, over-long integers, absurd nesting
        raise SnapshotError(f"line {number}: not acceptable JSON ({error})") from None
    if not isinstance(obj, dict):
        raise SnapshotError(f"line {number}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _expect(number: int, what: str, obj: dict[str, Any], expected: Iterable[str]) -> dict[str, Any]:
    """``obj`` if it has exactly the ``expected`` keys."""
    expected = tuple(expected)
    if missing := [key for key in expected if key not in obj]:
        raise SnapshotError(f"line {number}: {what} lacks field(s) {', '.join(missing)}")
    if extra := [_show(key) for key in obj if key not in expected]:
        raise SnapshotError(f"line {number}: {what} has unknown field(s) {', '.join(extra[:3])}")
    return obj


def _header(number: int, raw: bytes) -> SnapshotHeader:
    obj = _parse(number, raw)
    # Format and version first: they decide what else a header holds.
    if "format" not in obj and "t" in obj:
        raise SnapshotError(f"line {number}: the header is missing (found a {_show(obj['t'])} record)")
    if obj.get("format") != FORMAT:
        raise SnapshotError(f"line {number}: not a {FORMAT} snapshot (format {_show(obj.get('format'))})")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SnapshotError(f"line {number}: unknown snapshot version {_show(version)}")
    if version > VERSION:
        raise SnapshotError(
            f"line {number}: snapshot version {version} is newer than this tracker's {VERSION}"
        )
    _expect(number, "the header", obj, _CHECKS[SnapshotHeader])
    try:
        return SnapshotHeader(**obj)
    except InvalidInput as error:
        raise SnapshotError(f"line {number}: header: {error}") from None


def _trailer(number: int, obj: dict[str, Any], counts: dict[str, int]) -> None:
    _expect(number, "the end trailer", obj, ("t", *_COUNT_KEYS.values()))
    for tag, key in _COUNT_KEYS.items():
        if isinstance(obj[key], bool) or not isinstance(obj[key], int) or obj[key] < 0:
            raise SnapshotError(f"line {number}: the trailer's {key} is not a count: {_show(obj[key])}")
        if obj[key] != counts[tag]:
            raise SnapshotError(f"line {number}: the trailer counts {obj[key]} {key}, found {counts[tag]}")


def _records(numbered: Iterator[tuple[int, bytes]], header_line: int) -> Iterator[Record]:
    counts, number = dict.fromkeys(_TYPES, 0), header_line
    for number, raw in numbered:
        obj = _parse(number, raw)
        tag = obj.get("t")
        if tag == "end":
            _trailer(number, obj, counts)
            break
        if not isinstance(tag, str) or tag not in _TYPES:
            raise SnapshotError(f"line {number}: unknown record type {_show(tag)}")
        del _expect(number, f"the {tag} record", obj, ("t", *_CHECKS[_TYPES[tag]]))["t"]
        try:
            record = _TYPES[tag](**obj)
        except InvalidInput as error:
            raise SnapshotError(f"line {number}: {tag} record: {error}") from None
        counts[tag] += 1
        yield record
    else:
        raise SnapshotError(f"line {number + 1}: the end trailer is missing: the snapshot is truncated")
    for extra, _ in numbered:
        raise SnapshotError(f"line {extra}: data after the end trailer")


def _open(lines: Iterable[bytes]) -> tuple[SnapshotHeader, Iterator[Record]]:
    numbered = _numbered_lines(lines)
    if (first := next(numbered, None)) is None:
        raise SnapshotError("line 1: the input is empty; expected the snapshot header")
    return _header(*first), _records(numbered, first[0])


def iter_decode(lines: Iterable[bytes]) -> Iterator[SnapshotHeader | Record]:
    """Yield the header, then each record as it is read; the trailer is checked after the last one.

    Records arrive before the end is known to be intact, so a consumer applying them must keep the
    result provisional (one transaction) until the iteration ends without ``SnapshotError``.
    """
    header, records = _open(lines)
    yield header
    yield from records


def decode(lines: Iterable[bytes]) -> Snapshot:
    """Read a whole snapshot from its lines (or any chunking of its bytes), strictly validated."""
    return gather(*_open(lines))


def gather(header: SnapshotHeader, records: Iterable[Record]) -> Snapshot:
    """A whole ``Snapshot`` of ``header`` and its records, grouped by type in file order."""
    groups: dict[type, list[Any]] = {cls: [] for cls in _TYPES.values()}
    for record in records:
        groups[type(record)].append(record)
    peers, samples, mappings = (tuple(group) for group in groups.values())
    return Snapshot(header=header, peers=peers, samples=samples, mappings=mappings)
