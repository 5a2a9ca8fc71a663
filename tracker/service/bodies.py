"""JSON bodies decoded with a bound on the keys of any one object, before validation sees them.

A body of one object with 620,000 unknown keys (7 MB, under ``max_body_bytes``) held the event loop
for 2.7-3.5 s, most of it pydantic building an "extra field" error for every key, of which the
answer shows 100; every other request waited (QA round 57: a heartbeat's worst 3.6 s against a p99
of 7 ms). No body the API takes has an object of more than a dozen keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

#: The most keys of one JSON object in a request body.
MAX_KEYS_PER_OBJECT = 64


class TooManyKeys(ValueError):
    """A body's object holds more than ``MAX_KEYS_PER_OBJECT`` keys (FastAPI answers 400 with it
    as the cause, which the app's handler words)."""


def _capped(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_KEYS_PER_OBJECT:
        raise TooManyKeys(
            f"the body holds an object of {len(pairs)} members (a key given twice counts twice); "
            f"objects have at most {MAX_KEYS_PER_OBJECT} (the API's bodies have a dozen at most)"
        )
    return dict(pairs)  # the last of repeated keys wins, as json.loads does


class _CappedJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=_capped)
        return self._json


class CappedJsonRoute(APIRoute):
    """A route whose JSON body is decoded by ``_capped`` (FastAPI's documented custom-request hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def capped(request: Request) -> Response:
            return await handler(_CappedJsonRequest(request.scope, request.receive))

        return capped
