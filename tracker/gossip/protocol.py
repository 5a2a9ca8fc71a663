"""Gossip messages: the versioned wire format, its limits and its authentication. No SQL, no I/O.

A message is one JSON document (format ``peer-tracker-gossip``, version 2; docs/gossip.md lists every
field; version 1, whose peer rows always carry their samples, is still read and answered in kind),
gzip-compressed on the wire and signed with HMAC-SHA256 over the compressed bytes exactly as
sent. Checks run cheapest and safest first: size, signature (nothing unauthenticated is parsed),
bounded decompression, format and version, then the strict field validation (pydantic, unknown fields
refused), then the sender's clock. Replays are refused by the caller, which remembers nonces in the
database in the same transaction that applies the message.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import secrets
import zlib
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InvalidInput
from ..events import MAX_BYTES_PER_SEC, validate_id

FORMAT = "peer-tracker-gossip"
VERSION = 2
#: Versions this tracker reads; it answers each request in the request's own version.
VERSIONS = (1, 2)
SIGNATURE_SCHEME = "HMAC-SHA256"
#: Versions and clocks: JSON-safe integers, far below bigint's limit, so that no clock a neighbour
#: sets (an origin's, or this node's own, caught up to a neighbour's vector) overflows when stamped
#: on (fuzzing sent 2**63 - 1).
MAX_VERSION = 2**53 - 1
#: One origin's served or failed count of one peer: a million years of a chunk a second. Summed over
#: origins by selections and views (bigint); at 2**63 - 1 one row overflowed them (fuzzing).
MAX_COUNTER = 10**12


class GossipRejected(InvalidInput):
    """A gossip message was refused; ``reason`` names the check (a metrics label), ``status`` the HTTP
    status its sender gets. Nothing of a rejected message is applied."""

    def __init__(self, reason: str, message: str, status: int = 400, *, sender: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        #: The sending node, once its signature has been checked (``None`` before: it could be anyone).
        self.sender = sender


def _node_key(value: str) -> str:
    validate_id(value, "node key")
    if len(value) > 64:
        raise ValueError("a node key is at most 64 characters")
    return value


def _id(what: str) -> AfterValidator:
    def check(value: str) -> str:
        try:
            return validate_id(value, what)
        except InvalidInput as error:
            raise ValueError(str(error)) from None

    return AfterValidator(check)


NodeKey = Annotated[str, AfterValidator(_node_key)]
PeerKey = Annotated[str, _id("peer id")]
ContentKey = Annotated[str, _id("cid")]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=MAX_VERSION)]
Counter = Annotated[int, Field(ge=0, le=MAX_COUNTER)]
#: 0 only for rows imported from a snapshot (which carries none): they fill gaps and lose to any gossip.
Version = Annotated[int, Field(ge=0, le=MAX_VERSION)]
Speed = Annotated[int, Field(ge=0, le=MAX_BYTES_PER_SEC)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class PeerState(_Strict):
    """One origin's row for one peer at ``version``, with that origin's latest bandwidth samples if the
    receiver may lack them.

    ``samples_version`` is the row's version when its samples last changed. A row travels without
    ``samples`` (null) when that version is within the receiver's samples clock; the receiver then
    keeps its own, applying the row only over a stored row at least that new (docs/gossip.md).
    Message version 1 has no ``samples_version`` and always carries the samples.
    """

    peer: PeerKey
    first_seen: Seconds
    online: bool
    online_since: Seconds | None
    last_seen: Seconds
    uptime_s: Seconds
    served: Counter
    failed: Counter
    success_weight: Seconds
    failure_weight: Seconds
    evidence_at: Seconds | None
    updated_at: Seconds
    version: Version
    #: ``[at, bytes_per_sec]`` pairs, newest first, at most the origin's bandwidth window; null when
    #: not sent (unchanged since ``samples_version``).
    samples: list[tuple[Seconds, Speed]] | None = Field(default=None, max_length=1000)
    samples_version: Version | None = None

    @model_validator(mode="after")
    def _samples_known(self) -> PeerState:
        if self.samples_version is None and self.samples is None:
            raise ValueError("a peer row without its samples must give samples_version")
        if self.samples_version is not None and self.samples_version > self.version:
            raise ValueError("samples_version cannot be above the row's version")
        if self.samples is None and self.samples_version == 0:
            # Version 0 is a snapshot's, and no row of it travels: such samples could never come.
            raise ValueError("a peer row without its samples must give samples_version >= 1")
        return self

    @property
    def samples_at(self) -> int:
        """The version of the samples this row describes (in version 1, the row's own)."""
        return self.version if self.samples_version is None else self.samples_version


class MappingState(_Strict):
    """Whether ``peer`` holds ``cid``, as decided by the origin's change at ``changed_at``."""

    cid: ContentKey
    peer: PeerKey
    available: bool
    since: Seconds
    last_confirmed: Seconds
    changed_at: Seconds
    version: Version


class OriginDelta(_Strict):
    """One origin's rows with versions after ``base``; complete through ``upto`` (see docs/gossip.md).

    Rows carry their samples when those changed after ``samples_base`` (the receiver's samples clock
    as the sender knew it); once applied, every row whose samples changed by ``samples_upto`` is held
    with them, so a receiver whose samples clock was at least ``samples_base`` may raise it there.
    """

    origin: NodeKey
    base: Count
    upto: Count
    samples_base: Count = 0
    samples_upto: Count = 0
    peers: list[PeerState] = []
    mappings: list[MappingState] = []


class Message(_Strict):
    """A sync request (``kind="sync"``) or its answer (``kind="reply"``)."""

    format: Literal["peer-tracker-gossip"] = "peer-tracker-gossip"
    version: Literal[1, 2] = 2
    kind: Literal["sync", "reply"]
    node: NodeKey
    sent_at: Seconds
    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    #: The request this answers (replies only), so a reply cannot be replayed as another's answer.
    in_reply_to: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None
    #: Where the sender takes gossip, if it accepts any, and neighbours it knows (when learning is on).
    url: Annotated[str, Field(max_length=300)] | None = None
    neighbors: list[Annotated[str, Field(max_length=300)]] = Field(default=[], max_length=64)
    #: Per origin, the highest version the sender holds completely: what the other side answers against.
    vector: dict[NodeKey, Count] = Field(max_length=100_000)
    #: Per origin, the sender's samples clock: rows whose samples changed by then need not carry them.
    samples_vector: dict[NodeKey, Count] = Field(default={}, max_length=100_000)
    deltas: list[OriginDelta] = []
    #: The reply left rows out (limits); the requester may sync again at once.
    more: bool = False

    @model_validator(mode="after")
    def _version_1_rows(self) -> Message:
        if self.version == 1:
            for delta in self.deltas:
                for peer in delta.peers:
                    if peer.samples is None:
                        raise ValueError(f"a version 1 message carries every row's samples ({peer.peer})")
        return self

    @property
    def rows(self) -> int:
        return sum(len(d.peers) + len(d.mappings) for d in self.deltas)


def newest_time(row: PeerState | MappingState) -> float:
    """The latest time a row states (the origin's clock wrote them all)."""
    if isinstance(row, MappingState):
        return max(row.since, row.last_confirmed, row.changed_at)
    times = [row.first_seen, row.last_seen, row.updated_at]
    times += [t for t in (row.online_since, row.evidence_at) if t is not None]
    times += [at for at, _ in row.samples or ()]
    return max(times)


def _hold_future(delta: OriginDelta, latest: float) -> tuple[OriginDelta, int]:
    """The part of ``delta`` that states no time after ``latest``, and how many rows were held back.

    An origin whose clock ran ahead (or a bug, or a forged row) dates rows in the future; applied,
    they would pin a peer online or win every last-writer-wins for as long as the jump, and spread
    through every relay. They are held like rows missing their samples: every row from the first
    such version on is left out and ``upto`` lowered below it, so the receiver's clock of that
    origin stays there and the sender brings the rows again once they are no longer ahead.
    Clamping the times instead would make receivers with different clocks disagree for good.
    """
    rows: list[PeerState | MappingState] = [*delta.peers, *delta.mappings]
    future = [r.version for r in rows if newest_time(r) > latest]
    if not future:
        return delta, 0
    cut = min(future)
    peers = [p for p in delta.peers if p.version < cut]
    mappings = [m for m in delta.mappings if m.version < cut]
    # Samples claimed complete through samples_upto must include the held rows' samples: lower it.
    held_samples = [p.samples_at for p in delta.peers if p.version >= cut]
    part = delta.model_copy(
        update={
            "peers": peers,
            "mappings": mappings,
            "upto": max(0, min(delta.upto, cut - 1)),
            "samples_upto": max(0, min([delta.samples_upto, *(s - 1 for s in held_samples)])),
        }
    )
    return part, len(delta.peers) + len(delta.mappings) - len(peers) - len(mappings)


def hold_future(message: Message, latest: float) -> tuple[Message, int]:
    """``message`` without its rows dated after ``latest`` (see ``_hold_future``), and their count."""
    parts = [_hold_future(delta, latest) for delta in message.deltas]
    held = sum(n for _, n in parts)
    return (message.model_copy(update={"deltas": [d for d, _ in parts]}) if held else message), held


def new_nonce() -> str:
    return secrets.token_hex(16)


# -- keyring ------------------------------------------------------------------------------------


class Keyring:
    """Shared keys: the first signs, any verifies, so keys rotate without a flag day (memberlist style).

    A key id (the first 8 hex digits of the key's SHA-256) travels with the signature so the receiver
    tries one key, and an operator can see which key a peer still uses.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise InvalidInput("gossip needs at least one shared key")
        for key in keys:
            if not isinstance(key, str) or len(key) < 16:
                raise InvalidInput("every gossip key must be a string of at least 16 characters")
        self._keys = {self.key_id(key): key.encode() for key in keys}
        self.primary = self.key_id(keys[0])

    @staticmethod
    def key_id(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:8]

    def sign(self, body: bytes) -> str:
        """The ``Authorization`` header value for ``body``."""
        mac = hmac.new(self._keys[self.primary], body, hashlib.sha256).hexdigest()
        return f"{SIGNATURE_SCHEME} keyid={self.primary},signature={mac}"

    def verify(self, body: bytes, header: str | None) -> None:
        if not header:
            raise GossipRejected("unsigned", "the message is not signed (no Authorization header)", 401)
        scheme, _, params = header.partition(" ")
        fields = dict(part.partition("=")[::2] for part in params.split(",") if "=" in part)
        if scheme != SIGNATURE_SCHEME or "keyid" not in fields or "signature" not in fields:
            raise GossipRejected(
                "unsigned",
                f"expected an Authorization header '{SIGNATURE_SCHEME} keyid=...,signature=...'",
                401,
            )
        key = self._keys.get(fields["keyid"].strip())
        if key is None:
            raise GossipRejected("bad_signature", f"unknown key id {fields['keyid'][:16]!r}", 401)
        expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, answered 500
        # to a signature of "é...", QA round 68).
        if not hmac.compare_digest(expected, fields["signature"].strip().encode()):
            raise GossipRejected("bad_signature", "the signature does not match the message", 401)


# -- encoding and decoding ----------------------------------------------------------------------


#: Fields version 1 does not have (its readers refuse unknown fields).
_NOT_IN_V1: Any = {
    "samples_vector": True,
    "deltas": {
        "__all__": {"samples_base": True, "samples_upto": True, "peers": {"__all__": {"samples_version"}}}
    },
}


def encode(message: Message) -> bytes:
    """The compressed body (sign it with ``Keyring.sign``)."""
    exclude = _NOT_IN_V1 if message.version == 1 else None
    return gzip.compress(message.model_dump_json(exclude=exclude).encode(), compresslevel=6, mtime=0)


def decode(
    body: bytes,
    authorization: str | None,
    keyring: Keyring,
    *,
    max_bytes: int,
    now: float,
    max_skew_s: float,
) -> Message:
    """Authenticate and validate one message; ``GossipRejected`` says which check failed."""
    if len(body) > max_bytes:
        raise GossipRejected(
            "oversized",
            f"the message is over {max_bytes} bytes, the limit (gossip max_bytes, stated in "
            "the X-Gossip-Max-Bytes header of every answer: senders of earlier releases ignore it)",
            413,
        )
    keyring.verify(body, authorization)
    text = _inflate(body, max_bytes * 20)
    try:
        message = Message.model_validate_json(text)
    except ValidationError as error:
        raise _rejection(error) from None
    if message.sent_at < now - max_skew_s:
        raise GossipRejected(
            "too_old",
            f"the message was sent {now - message.sent_at:.6g} s ago; the limit is {max_skew_s:g} s",
            sender=message.node,
        )
    if message.sent_at > now + max_skew_s:
        raise GossipRejected(
            "from_future",
            f"the message is dated {message.sent_at - now:.6g} s ahead; the limit is {max_skew_s:g} s",
            sender=message.node,
        )
    return message


def _rejection(error: ValidationError) -> GossipRejected:
    """Name the first problem; a wrong format or version is reported as such, before any field."""
    problems = error.errors()
    for problem in problems:
        if problem["loc"][:1] == ("format",):
            return GossipRejected("malformed", f"not a {FORMAT} message")
    for problem in problems:
        if problem["loc"][:1] == ("version",):
            got = problem.get("input")
            known = " or ".join(str(v) for v in VERSIONS)
            if not isinstance(got, int) or isinstance(got, bool):  # "2" is not 2 in strict JSON
                return GossipRejected(
                    "unknown_version", f"message version must be the number {known}, got {repr(got)[:20]}"
                )
            return GossipRejected(
                "unknown_version", f"message version {got} is not {known}, which this tracker reads"
            )
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "top level"
    return GossipRejected("malformed", f"invalid message at {where}: {first['msg']}")


def _inflate(body: bytes, limit: int) -> bytes:
    """Gunzip at most ``limit`` bytes, so a small bomb cannot expand into gigabytes."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        text = inflater.decompress(body, limit)
        if inflater.unconsumed_tail:
            raise GossipRejected("oversized", f"the message expands beyond {limit} bytes", 413)
        if not inflater.eof:
            raise GossipRejected("malformed", "the gzip stream is truncated")
    except zlib.error as error:
        raise GossipRejected("malformed", f"not a gzip stream: {error}") from None
    return text


def signed(message: Message, keyring: Keyring) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one message, ready to send."""
    body = encode(message)
    return body, {
        # Not Content-Encoding: gzip, which HTTP clients undo on the fly: the signature covers the
        # compressed bytes exactly as sent, so they travel as an opaque gzip document.
        "Content-Type": "application/gzip",
        "Authorization": keyring.sign(body),
    }


def as_json(message: Message) -> dict[str, Any]:
    return message.model_dump(mode="json")
