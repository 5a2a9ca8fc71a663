"""docs/gossip.md, "Gossip from your own application": the example runs as written, twice, and the
two applications gossip over HTTP on 127.0.0.1 (one node on each engine)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tracker import TrackerClosed

DOC = (Path(__file__).parent.parent / "docs" / "gossip.md").read_text()
(EXAMPLE,) = re.findall(r"## Gossip from your own application\n.*?```python\n(.*?)```", DOC, flags=re.S)
DOC_URL = 'database_url="sqlite+aiosqlite:///edge.db"'
DOC_NEIGHBORS = 'neighbors=("http://127.0.0.1:8081/tracker",),'


def _application(database_url: str) -> dict[str, Any]:
    """The example's module namespace, on ``database_url`` and with no neighbour yet (their ports
    are known once both listen)."""
    assert DOC_URL in EXAMPLE and DOC_NEIGHBORS in EXAMPLE, "the example changed: update this test"
    code = EXAMPLE.replace(DOC_URL, f"database_url={database_url!r}").replace(DOC_NEIGHBORS, "")
    namespace: dict[str, Any] = {"__name__": "gossip_example"}
    exec(compile(code, "docs/gossip.md", "exec"), namespace)
    return namespace


async def _serve(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the example's application did not start"
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def test_the_documented_embedding_gossips_between_two_applications(db_url: str, tmp_path: Path) -> None:
    nodes = [_application(db_url), _application(f"sqlite+aiosqlite:///{tmp_path / 'edge-b.db'}")]
    served = [await _serve(node["app"]) for node in nodes]
    try:
        (a, b), ports = nodes, [port for _, _, port in served]
        a["agent"].add_neighbor(f"http://127.0.0.1:{ports[1]}/tracker")
        b["agent"].add_neighbor(f"http://127.0.0.1:{ports[0]}/tracker")
        await a["tracker"].record_peer_online("peer-a")
        await a["tracker"].record_content_available("cid-1", "peer-a")
        await b["tracker"].record_peer_online("peer-b")
        assert [t.get_coro().__qualname__ for t in asyncio.all_tasks()].count("GossipAgent.run") == 2
        for node in nodes:
            assert await node["agent"].round() == 1  # one neighbour, reached
        for node in nodes:
            assert await node["tracker"].get_available_peers("cid-1") == ["peer-a"]
            assert {p.peer_id for p in await node["tracker"].list_peers()} == {"peer-a", "peer-b"}
            assert node["agent"].stats.failures == 0
    finally:
        for server, _, _ in served:
            server.should_exit = True
        await asyncio.gather(*(task for _, task, _ in served))
    for node in nodes:  # the lifespan closed each tracker, and the gossip task is gone
        with pytest.raises(TrackerClosed):
            await node["tracker"].record_peer_online("late")
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "GossipAgent.run"]
