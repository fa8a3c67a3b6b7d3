"""The HTTP API: authentication, per-broker isolation, ingest, feeds, long-poll, errors."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ldf.alerts import formats
from ldf.alerts.client import AlertClient, HttpFeedSource
from ldf.alerts.synthetic import alert_id_for
from ldf.errors import NotFoundError, StateError, UserInputError
from tests.alerts.conftest import VISIT, Served, packets


def client(served: Served, who: str) -> AlertClient:
    return AlertClient(served.url, served.tokens[who])


def test_tokens_and_roles(served: Served) -> None:
    r = httpx.get(f"{served.url}/alerts/v1/feeds")
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "missing bearer token"
    r = httpx.get(f"{served.url}/alerts/v1/feeds", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    with client(served, "fink") as fink, pytest.raises(UserInputError, match="403"):
        fink.ingest(packets(VISIT, 1))
    with client(served, "prompt") as prompt, pytest.raises(UserInputError, match="403"):
        prompt.create_feed(name="p", broker="prompt")
    # A revoked token stops working at once.
    served.credentials.remove("lasair")
    with client(served, "lasair") as lasair, pytest.raises(UserInputError, match="401"):
        lasair.feeds()


def test_brokers_see_only_their_own_feeds(served: Served) -> None:
    with client(served, "fink") as fink, client(served, "lasair") as lasair:
        fink.create_feed(name="fink-full", broker="fink")
        with pytest.raises(UserInputError, match="403"):
            lasair.create_feed(name="x", broker="fink")
        lasair.create_feed(name="lasair-lite", broker="lasair", format="notification")
        assert [f["name"] for f in fink.feeds()] == ["fink-full"]
        for call in (
            lambda: lasair.entries("fink-full", after=None),
            lambda: lasair.ack("fink-full", 0),
            lambda: lasair.feed_status("fink-full"),
            lambda: lasair.replay(feed="fink-full", visits=[VISIT]),
        ):
            with pytest.raises(UserInputError, match="403"):
                call()
    with client(served, "ops") as ops:
        assert {f["name"] for f in ops.feeds()} == {"fink-full", "lasair-lite"}


def test_ingest_fetch_ack_over_http(served: Served) -> None:
    with client(served, "fink") as fink, client(served, "prompt") as prompt:
        fink.create_feed(name="fink-full", broker="fink")
        assert prompt.ingest(packets(VISIT, 5)) == {
            "accepted": 5, "duplicates": 0, "first_position": 1, "last_position": 5,
        }  # fmt: skip
        assert prompt.ingest(packets(VISIT, 5))["duplicates"] == 5
        assert prompt.close_visit(VISIT)["count"] == 5
        got = fink.entries("fink-full", after=None, max_entries=3)
        assert [e.alert_id for e in got] == [alert_id_for(VISIT, i) for i in range(3)]
        assert got[0].body == packets(VISIT, 1)[0]
        fink.ack("fink-full", got[-1].position)
        rest = fink.entries("fink-full", after=None)
        assert [e.kind for e in rest] == ["alert", "alert", "manifest"]
        assert json.loads(rest[-1].body)["count"] == 5
        assert fink.alert(alert_id_for(VISIT, 4)) == packets(VISIT, 5)[4]
        assert fink.visit_alert_ids(VISIT) == [alert_id_for(VISIT, i) for i in range(5)]
        assert fink.manifest(VISIT)["count"] == 5
        note = json.loads(fink.alert(alert_id_for(VISIT, 4), format="notification"))
        assert note["alertId"] == alert_id_for(VISIT, 4)
        with pytest.raises(NotFoundError):
            fink.alert(1)
        with pytest.raises(UserInputError, match="last entry"):
            fink.ack("fink-full", 999)


def test_long_poll_returns_as_soon_as_alerts_arrive(served: Served) -> None:
    with client(served, "fink") as fink, client(served, "prompt") as prompt:
        fink.create_feed(name="f", broker="fink")
        timer = threading.Timer(0.3, lambda: prompt.ingest(packets(VISIT, 2)))
        timer.start()
        t0 = time.monotonic()
        got = fink.entries("f", after=None, wait_s=20.0)
        waited = time.monotonic() - t0
        timer.join()
        assert [e.alert_id for e in got][:1] == [alert_id_for(VISIT, 0)]
        assert waited < 15.0  # woke on the ingest, not at the end of the wait
        assert fink.entries("f", after=got[-1].position, wait_s=0.2) == []


def test_bad_requests_get_clear_errors(served: Served) -> None:
    auth = {"Authorization": f"Bearer {served.tokens['prompt']}"}
    url = f"{served.url}/alerts/v1/ingest"
    r = httpx.post(url, content=b"\x00\x00\x00\x09abc", headers=auth)
    assert r.status_code == 400
    assert "truncated" in r.json()["error"]["message"]
    r = httpx.post(url, content=formats.pack_packets([b"\x00\x00\x00\x04\x4dxx"]), headers=auth)
    assert r.status_code == 422
    served.service.policy.max_ingest_bytes = 1000
    r = httpx.post(url, content=formats.pack_packets(list(packets(VISIT, 1))), headers=auth)
    assert r.status_code == 413
    assert served.service.store.counts()["alerts"] == 0
    ops = {"Authorization": f"Bearer {served.tokens['ops']}"}
    r = httpx.post(f"{served.url}/alerts/v1/feeds", json={"name": "bad name", "broker": "x"},
                   headers=ops)  # fmt: skip
    assert r.status_code == 400
    assert "feed name" in r.json()["error"]["message"]
    r = httpx.get(f"{served.url}/alerts/v1/feeds/none/entries", headers=ops)
    assert r.status_code == 404


def test_schemas_are_served_by_id(served: Served) -> None:
    listed = httpx.get(f"{served.url}/alerts/v1/schemas").json()
    assert {s["version"] for s in listed} >= {"11.0", "11.1"}
    with client(served, "fink") as fink:
        body = fink.schema(1101)
    schema = json.loads(body["schema"])
    assert schema["name"].endswith("alert")
    assert not any(k.startswith("__") for k in schema)
    r = httpx.get(f"{served.url}/alerts/v1/schemas/ids/42")
    assert r.status_code == 404


def test_status_json_and_public_page(served: Served) -> None:
    with client(served, "fink") as fink, client(served, "prompt") as prompt:
        fink.create_feed(name="fink-full", broker="fink")
        prompt.ingest(packets(VISIT, 3))
        src = HttpFeedSource(served.url, served.tokens["fink"], "fink-full")
        got = src.fetch(0, wait_s=0)
        src.ack(got[-1].position)
        src.close()
        st = fink.status()
    (feed,) = st["feeds"]
    assert feed["delivered"] == 3
    assert feed["lag_entries"] == 0
    assert feed["last_ack_unix"] is not None
    page = httpx.get(f"{served.url}/alerts/status")
    assert page.status_code == 200
    assert "fink-full" in page.text


def test_nats_feeds_are_not_read_over_http(served: Served) -> None:
    with client(served, "fink") as fink:
        fink.create_feed(name="fink-nats", broker="fink", transport="nats")
        with pytest.raises(StateError, match="delivered over nats"):
            fink.entries("fink-nats", after=None)
        with pytest.raises(StateError, match="delivered over nats"):
            fink.ack("fink-nats", 0)


def test_feed_source_errors(served: Served) -> None:
    from ldf.errors import TransportError

    with client(served, "fink") as fink:
        fink.create_feed(name="fink-full", broker="fink")
    src = HttpFeedSource(served.url, served.tokens["lasair"], "fink-full")
    with pytest.raises(UserInputError, match="403"):
        src.fetch(0, wait_s=0)
    src.close()
    src = HttpFeedSource(served.url, served.tokens["fink"], "nope")
    with pytest.raises(NotFoundError):
        src.fetch(0, wait_s=0)
    src.close()
    src = HttpFeedSource("http://127.0.0.1:9", served.tokens["fink"], "fink-full")
    with pytest.raises(TransportError, match="unreachable"):
        src.fetch(0, wait_s=0)
    with pytest.raises(UserInputError, match="http"):
        HttpFeedSource("ftp://x", "t", "f")
