"""The OODS HTTP API in-process: tokens, search, downloads with ranges, path escapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.butler.rawfiles import exp_id
from tests.oods.conftest import TOKEN, AddRaw

from ldf.db import utcnow
from ldf.oods.handlers import create_app, parse_range
from ldf.oods.service import Oods

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(oods: Oods) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(oods))
    async with httpx.AsyncClient(transport=transport, base_url="http://oods") as c:
        yield c


def _url(path: str) -> str:
    return f"/files/{path}"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
async def test_no_or_wrong_token_is_401(
    client: httpx.AsyncClient, add_raw: AddRaw, headers: dict[str, str]
) -> None:
    entry = add_raw(1)
    for url in ("/files", _url(entry.path), "/status", "/stream"):
        r = await client.get(url, headers=headers)
        assert r.status_code == 401, url
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "unauthorized"


async def test_every_token_in_the_file_works(client: httpx.AsyncClient) -> None:
    r = await client.get("/files", headers={"Authorization": "Bearer other-token"})
    assert (r.status_code, r.json()) == (200, [])


async def test_health_needs_no_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json()["ok"] is True


async def test_search(client: httpx.AsyncClient, add_raw: AddRaw) -> None:
    a = add_raw(1, "R22_S11")
    b = add_raw(1, "R22_S12")
    c = add_raw(2, "R22_S11")
    r = await client.get("/files", headers=AUTH)
    assert [e["id"] for e in r.json()] == [a.id, b.id, c.id]
    r = await client.get(
        "/files", params={"exposure": exp_id(1), "detector": "R22_S12"}, headers=AUTH
    )
    assert [e["path"] for e in r.json()] == [b.path]
    r = await client.get("/files", params={"obs_id": c.obs_id, "limit": 5}, headers=AUTH)
    assert [e["id"] for e in r.json()] == [c.id]
    r = await client.get("/files", params={"day_obs": 20261121, "limit": 2}, headers=AUTH)
    assert len(r.json()) == 2
    r = await client.get("/files", params={"since": c.arrived_at.isoformat()}, headers=AUTH)
    assert [e["id"] for e in r.json()] == [c.id]
    r = await client.get("/files", params={"limit": 0}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_input"
    r = await client.get("/files", params={"day_obs": "yesterday"}, headers=AUTH)
    assert r.status_code == 400


async def test_download_whole_file(client: httpx.AsyncClient, oods: Oods, add_raw: AddRaw) -> None:
    entry = add_raw(1)
    data = (oods.root / entry.path).read_bytes()
    r = await client.get(_url(entry.path), headers=AUTH)
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["etag"] == f'"{entry.checksum}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(len(data))
    assert oods.store.active_leases(utcnow()) == 0  # released once sent


async def test_ranges(client: httpx.AsyncClient, oods: Oods, add_raw: AddRaw) -> None:
    entry = add_raw(1)
    data = (oods.root / entry.path).read_bytes()
    size = len(data)
    r = await client.get(_url(entry.path), headers={**AUTH, "Range": "bytes=0-99"})
    assert r.status_code == 206
    assert r.content == data[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{size}"
    r = await client.get(_url(entry.path), headers={**AUTH, "Range": "bytes=-100"})
    assert (r.status_code, r.content) == (206, data[-100:])
    assert r.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
    r = await client.get(_url(entry.path), headers={**AUTH, "Range": f"bytes={size - 10}-"})
    assert (r.status_code, r.content) == (206, data[-10:])
    r = await client.get(_url(entry.path), headers={**AUTH, "Range": f"bytes=100-{size + 500}"})
    assert (r.status_code, r.content) == (206, data[100:])
    for beyond in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        r = await client.get(_url(entry.path), headers={**AUTH, "Range": beyond})
        assert r.status_code == 416, beyond
        assert r.headers["content-range"] == f"bytes */{size}"
        assert r.json()["error"]["code"] == "range_not_satisfiable"
    r = await client.get(_url(entry.path), headers={**AUTH, "Range": "lines=1-2"})
    assert r.status_code == 400
    # If-Range with the ETag (the checksum) honours the range.
    r = await client.get(
        _url(entry.path), headers={**AUTH, "Range": "bytes=0-9", "If-Range": f'"{entry.checksum}"'}
    )
    assert (r.status_code, r.content) == (206, data[:10])
    assert oods.store.active_leases(utcnow()) == 0


def test_parse_range() -> None:
    assert parse_range("bytes=0-99", 1000) == [(0, 100)]
    assert parse_range("bytes=-100", 50) == [(0, 50)]
    assert parse_range("bytes=990-", 1000) == [(990, 1000)]
    assert parse_range("bytes=0-0, 5-9", 1000) == [(0, 1), (5, 10)]


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/files/LSSTCam/20261121/../../tokens",
        b"/files/%2e%2e/%2e%2e/%2e%2e/tokens",
        b"/files/LSSTCam/20261121/MC_O_20261121_000001/..%2F..%2F..%2Ftokens",
        b"/files/LSSTCam/20261121/MC_O_20261121_000001/%2e%2e",
        b"/files/LSSTCam/20261121/MC_O_20261121_000001/MC_O_20261121_000001_..%2Ftokens.fits",
        b"/files/LSSTCam/20261121/%2e%2e/MC_O_20261121_000001_R22_S11.fits",
        b"/files/LSSTCam/2026112%31/MC_O_20261121_000001/MC_O_20261121_000001_R22_S99.fits",
        b"/files/..%2F..%2Fetc/20261121/x/passwd",
        b"/files/LSSTCam/../../../../etc/passwd",
        b"/files/tokens",
    ],
)
async def test_path_escapes_are_never_served(
    client: httpx.AsyncClient, add_raw: AddRaw, raw_path: bytes
) -> None:
    add_raw(1)
    request = client.build_request("GET", "http://oods/", headers=AUTH)
    request.url = request.url.copy_with(raw_path=raw_path)
    r = await client.send(request)
    assert r.status_code in (400, 404), raw_path
    assert "error" in r.json()


async def test_symlink_out_of_the_tree_is_not_served(
    client: httpx.AsyncClient, oods: Oods, add_raw: AddRaw, tmp_path: Path
) -> None:
    entry = add_raw(1)
    secret = tmp_path / "secret.fits"
    secret.write_bytes(b"SECRET")
    path = oods.root / entry.path
    path.unlink()
    path.symlink_to(secret)
    r = await client.get(_url(entry.path), headers=AUTH)
    assert r.status_code == 404
    assert b"SECRET" not in r.content


async def test_unindexed_file_in_the_tree_is_not_served(
    client: httpx.AsyncClient, oods: Oods, add_raw: AddRaw
) -> None:
    entry = add_raw(1)
    stray = (oods.root / entry.path).with_name("MC_O_20261121_000001_R22_S12.fits")
    stray.write_bytes(b"not indexed")
    r = await client.get(_url(entry.path).replace("R22_S11", "R22_S12"), headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


async def test_status(client: httpx.AsyncClient, add_raw: AddRaw) -> None:
    add_raw(1)
    r = await client.get("/status", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["files"] == 1
    assert body["classes"][0]["instrument"] == "LSSTCam"
