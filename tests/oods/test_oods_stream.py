"""The live arrival stream (server-sent events) over a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from tests.oods.conftest import TOKEN, AddRaw, write_raw

from ldf.oods.daemon import serve_oods
from ldf.oods.service import Oods

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 10.0
"""Seconds a test waits for an event before failing (events come in milliseconds)."""


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Parse server-sent events; comments come as {'comment': text}."""
    event: dict[str, Any] = {}
    async for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


async def _next_arrival(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for ev in events:
            if ev.get("event") == "arrival":
                return ev
        raise AssertionError("stream ended")

    return await asyncio.wait_for(first(), TIMEOUT)


async def test_stream_delivers_arrivals_and_resumes(oods: Oods, add_raw: AddRaw) -> None:
    before = add_raw(1)  # arrived before anyone followed: not replayed without Last-Event-ID
    async with (
        serve_oods(oods, heartbeat_s=0.2, poll_s=0.05) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=TIMEOUT) as client,
    ):
        async with client.stream("GET", "/stream") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _events(r.aiter_lines())
            added = await asyncio.to_thread(add_raw, 2)
            ev = await _next_arrival(events)
            assert json.loads(ev["data"])["id"] == added.id
            first_id = int(ev["id"])
            more = [await asyncio.to_thread(add_raw, 3, d) for d in ("R22_S11", "R22_S12")]
            got = [json.loads((await _next_arrival(events))["data"])["id"] for _ in more]
            assert got == [e.id for e in more]

            # An idle stream sends heartbeat comments.
            async def heartbeat() -> None:
                async for ev in events:
                    if ev.get("comment") == "heartbeat":
                        return

            await asyncio.wait_for(heartbeat(), TIMEOUT)
        # Resume after the first arrival seen: the two that followed it, in order.
        async with client.stream("GET", "/stream", headers={"Last-Event-ID": str(first_id)}) as r:
            events = _events(r.aiter_lines())
            resumed = [json.loads((await _next_arrival(events))["data"])["id"] for _ in more]
            assert resumed == [e.id for e in more]
        async with client.stream("GET", "/stream", params={"after": 0}) as r:
            events = _events(r.aiter_lines())
            assert json.loads((await _next_arrival(events))["data"])["id"] == before.id
        r = await client.get("/stream", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 400


async def test_stream_sees_arrivals_from_another_process(
    oods: Oods, make_oods: Callable[..., Oods]
) -> None:
    archiver = make_oods()  # another Oods on the same index, as the archiver's process holds
    async with (
        serve_oods(oods, heartbeat_s=5, poll_s=0.05) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=TIMEOUT) as client,
        client.stream("GET", "/stream", params={"instrument": "LATISS"}) as r,
    ):
        events = _events(r.aiter_lines())
        kw = write_raw(archiver, 1, "R22_S11")
        await asyncio.to_thread(archiver.add, kw.pop("path"), **kw)  # filtered out
        kw = write_raw(archiver, 1, "RXX_S00", instrument="LATISS")
        entry = await asyncio.to_thread(archiver.add, kw.pop("path"), **kw)
        ev = await _next_arrival(events)
        assert json.loads(ev["data"])["id"] == entry.id
        assert len(oods.followers) == 1


async def test_download_over_http(oods: Oods, add_raw: AddRaw) -> None:
    entry = add_raw(1)
    async with (
        serve_oods(oods) as url,
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=TIMEOUT) as client,
    ):
        r = await client.get(f"/files/{entry.path}", headers={"Range": "bytes=0-99"})
        assert r.status_code == 206
        assert r.content == (oods.root / entry.path).read_bytes()[:100]
