"""Any message that passes validation leaves its receiver able to gossip and to answer reads.

QA round 5 found one signed, well-formed message (a row without its samples, ``samples_version``
0) that stored an origin clock of -1; every message the receiver built afterwards failed its own
validation, and gossip stopped both ways for good. Here hypothesis builds well-formed messages
around the edges of every field, each is merged, and after each the receiver must still exchange
with a clean neighbour both ways and answer for every peer it names.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from gossip_helpers import KEY, LocalNet
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.protocol import MAX_COUNTER, MAX_VERSION, Keyring, Message, new_nonce, signed
from tracker.testing import ManualClock

T0 = 1_800_000_000.0
SELF = "<the receiver>"  # replaced by its node key: a vector may claim more of it than it holds
PEERS = [f"p{i}" for i in range(40)]  # many: most rows arrive for a peer not held yet

versions = st.sampled_from([0, 1, 2, 3, 7, 1_000, MAX_VERSION - 1, MAX_VERSION])
counts = st.sampled_from([0, 1, 5, 10**9, MAX_COUNTER])
times = st.sampled_from([0.0, 1.0, T0 - 86_400 * 30, T0 - 3_600, T0 - 1, T0, T0 + 30, T0 + 3_600, 1e15])
weights = st.sampled_from([0.0, 1e-300, 0.5, 1.0, 1e6, 1e300])
speeds = st.sampled_from([0, 1, 10**6, 10**12])


@st.composite
def peer_rows(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(versions)
    carried = draw(st.booleans())
    return {
        "peer": draw(st.sampled_from(PEERS)),
        "first_seen": draw(times),
        "online": draw(st.booleans()),
        "online_since": draw(st.none() | times),
        "last_seen": draw(times),
        "uptime_s": draw(st.sampled_from([0.0, 1.0, 1e9])),
        "served": draw(counts),
        "failed": draw(counts),
        "success_weight": draw(weights),
        "failure_weight": draw(weights),
        "evidence_at": draw(st.none() | times),
        "updated_at": draw(times),
        "version": version,
        "samples": draw(st.lists(st.tuples(times, speeds), max_size=3)) if carried else None,
        "samples_version": draw(st.sampled_from([None, 0, 1, version // 2, version])),
    }


@st.composite
def mapping_rows(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "cid": draw(st.sampled_from(["c0", "c1"])),
        "peer": draw(st.sampled_from(PEERS)),
        "available": draw(st.booleans()),
        "since": draw(times),
        "last_confirmed": draw(times),
        "changed_at": draw(times),
        "version": draw(versions),
    }


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    origins = ["fuzzer", "elsewhere", SELF]
    return {
        "kind": "sync",
        "node": "fuzzer",
        "sent_at": T0,
        "nonce": new_nonce(),
        "vector": draw(st.dictionaries(st.sampled_from(origins), versions, max_size=2)),
        "samples_vector": draw(st.dictionaries(st.sampled_from(origins), versions, max_size=2)),
        "more": draw(st.booleans()),
        "deltas": [
            {
                "origin": draw(st.sampled_from(origins)),
                "base": draw(versions),
                "upto": draw(versions),
                "samples_base": draw(versions),
                "samples_upto": draw(versions),
                "peers": draw(st.lists(peer_rows(), max_size=3)),
                "mappings": draw(st.lists(mapping_rows(), max_size=3)),
            }
            for _ in range(draw(st.integers(0, 2)))
        ],
    }


@pytest.fixture
async def pair(db_url: str, other_db_url: str) -> AsyncIterator[tuple[GossipAgent, GossipAgent]]:
    clock = ManualClock(T0)
    net = LocalNet()
    agents = []
    for name, url, other in (("http://t", db_url, "http://n"), ("http://n", other_db_url, "http://t")):
        tracker = await AvailabilityTracker.open(TrackerConfig(database_url=url, clock=clock))
        gossip = GossipConfig(keys=(KEY,), neighbors=(other,), message_burst=10_000)  # the clock stands
        agent = GossipAgent(tracker, gossip, transport=net)
        net.agents[name] = agent
        agents.append(agent)
    await agents[1].tracker.record_peer_online("clean")
    await agents[1].tracker.record_content_available("c0", "clean")
    try:
        yield agents[0], agents[1]
    finally:
        for agent in agents:
            await agent.tracker.close()


@pytest.mark.timeout(600)
async def test_any_valid_message_leaves_the_receiver_able_to_gossip(
    pair: tuple[GossipAgent, GossipAgent],
) -> None:
    target, neighbour = pair

    @settings(
        max_examples=100,
        derandomize=True,  # the same messages in every run: CI never fails on a new draw
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(messages())
    def run(doc: dict[str, Any]) -> None:
        doc = json.loads(json.dumps(doc).replace(SELF, target.node_key))
        try:
            message = Message(**doc)
        except ValidationError:
            reject()
        pending.append(message)

    # hypothesis drives a synchronous function: draw the messages, then send them in order.
    pending: list[Message] = []
    run()
    assert pending, "hypothesis drew no valid message"
    for message in pending:
        body, headers = signed(message, Keyring([KEY]))
        status, answer, _ = await target.handle(body, headers["Authorization"])
        assert status in (200, 400, 409), (status, answer[:300], message)
        await target.tracker.record_peer_online("local")  # stamped on whatever clock it now has
        failures = (target.stats.failures, neighbour.stats.failures)
        assert await target.round() == 1 and await neighbour.round() == 1, message
        assert (target.stats.failures, neighbour.stats.failures) == failures, message
        for peer in {row.peer for delta in message.deltas for row in delta.peers} | {"clean"}:
            await target.tracker.get_peer_metrics(peer)  # answers, whatever was merged
        await target.tracker.select_best_peers("c0", 3)
