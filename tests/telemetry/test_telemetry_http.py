"""The HTTP API in-process: acceptance, every refusal (401 403 404 409 413 422 503), audit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ldf.ocs.models import State
from ldf.telemetry.handlers import create_app
from ldf.telemetry.models import EXAMPLES, TOPICS
from ldf.telemetry.service import TelemetryGateway, producers_path
from ldf.telemetry.tokens import ProducerFile
from tests.telemetry.conftest import Http, Tokens, image_quality, make_settings, message

IQ = "/topics/imageQuality/messages"


def error_of(r: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = r.json()["error"]
    return body


async def test_accepted_then_duplicate(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    client = http(tokens.prompt)
    r = await client.post(IQ, json=message("iq-1", image_quality()))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "accepted"
    assert body["seq"] == 1
    assert body["bus_topic"] == "ocs.MTPrompt.tel.imageQuality"
    again = await client.post(IQ, json=message("iq-1", image_quality()))
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert again.json()["received_at"] == body["received_at"]
    # What is buffered is the payload as validated; NaN measurements arrive as null.
    (stored,) = gateway.store.messages("prompt")
    assert stored.payload == image_quality()
    assert stored.payload["zero_point_err"] is None


async def test_every_kind_of_payload_the_producers_send(http: Http, tokens: Tokens) -> None:
    prompt, batch = http(tokens.prompt), http(tokens.batch)
    for name, client in (("imageQuality", prompt), ("calibrationQA", prompt)):
        r = await client.post(f"/topics/{name}/messages", json=message(name, dict(EXAMPLES[name])))
        assert r.status_code == 201, r.text
    r = await batch.post(
        "/topics/batchJobResult/messages", json=message("job-7", dict(EXAMPLES["batchJobResult"]))
    )
    assert r.status_code == 201, r.text
    assert r.json()["bus_topic"] == "ocs.OCSBatch.tel.batchJobResult"


async def test_401_without_a_valid_token(http: Http, gateway: TelemetryGateway) -> None:
    for client, why in (
        (http(None), "missing bearer token"),
        (http("not-a-token"), "invalid bearer token"),
    ):
        r = await client.post(IQ, json=message("m", image_quality()))
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert why in error_of(r)["message"]
        assert (await client.get("/topics")).status_code == 401
    r = await http(None).post(
        IQ, json=message("m", image_quality()), headers={"Authorization": "Basic eA=="}
    )
    assert r.status_code == 401
    assert "expected Bearer" in error_of(r)["message"]
    assert gateway.store.messages() == []
    rows = gateway.audit()
    assert {(a.producer, a.outcome, a.status) for a in rows} == {
        ("unauthenticated", "rejected", 401)
    }
    assert len(rows) == 3
    assert rows[0].client == "10.0.0.7"
    assert "not-a-token" not in json.dumps([a.model_dump(mode="json") for a in rows])


async def test_403_outside_the_tokens_scope(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    r = await http(tokens.prompt).post(
        "/topics/batchJobResult/messages", json=message("j", dict(EXAMPLES["batchJobResult"]))
    )
    assert r.status_code == 403
    assert error_of(r) == {
        "code": "forbidden",
        "message": "producer prompt may not send batchJobResult "
        "(its token covers imageQuality, calibrationQA)",
    }
    r = await http(tokens.ops).post(IQ, json=message("m", image_quality()))
    assert r.status_code == 403
    # Status and audit are for operators.
    for path in ("/status", "/audit"):
        r = await http(tokens.prompt).get(path)
        assert r.status_code == 403
        assert "not an operator" in error_of(r)["message"]
    assert gateway.store.messages() == []
    assert [a.status for a in gateway.audit(producer="prompt")] == [403]


async def test_404_unknown_topic(http: Http, tokens: Tokens, gateway: TelemetryGateway) -> None:
    r = await http(tokens.prompt).post("/topics/seeing/messages", json=message("m", {}))
    assert r.status_code == 404
    assert error_of(r)["code"] == "unknown_topic"
    assert "imageQuality, calibrationQA, batchJobResult" in error_of(r)["message"]
    assert (await http(tokens.prompt).get("/topics/seeing/schema")).status_code == 404
    (row,) = gateway.audit()
    assert (row.topic, row.status) == ("seeing", 404)


@pytest.mark.parametrize(
    ("payload", "path", "why"),
    [
        ({"seeing_arcsec": "0.8"}, "payload.seeing_arcsec", "valid number"),
        ({"n_sources": True}, "payload.n_sources", "valid integer"),
        ({"n_sources": 1.5}, "payload.n_sources", "valid integer"),
        ({"n_sources": -1}, "payload.n_sources", "greater than or equal to 0"),
        ({"humidity": 0.3}, "payload.humidity", "Extra inputs are not permitted"),
        ({"detector": "R22/S11"}, "payload.detector", "should match pattern"),
        ({"exposure_id": None}, "payload.exposure_id", "valid integer"),
    ],
)
async def test_422_names_the_field(
    http: Http,
    tokens: Tokens,
    gateway: TelemetryGateway,
    payload: dict[str, Any],
    path: str,
    why: str,
) -> None:
    r = await http(tokens.prompt).post(IQ, json=message("bad-1", image_quality(**payload)))
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["code"] == "schema_violation"
    assert err["message"].startswith(f"imageQuality message: {path}: ")
    assert why in err["message"]
    assert err["errors"][0]["path"] == path
    assert gateway.store.messages() == []
    (row,) = gateway.audit()
    assert (row.producer, row.outcome, row.status, row.message_id) == (
        "prompt", "rejected", 422, "bad-1",
    )  # fmt: skip
    assert path in row.reason


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"message_id": "m", "payload": {"exposure_id": 1, "detector": "R22_S11", '
         b'"seeing_arcsec": NaN}}', "payload.seeing_arcsec: Input should be a finite number"),
        (b'{"message_id": "m", "payload": {"exposure_id": 1, "detector": "R22_S11"',
         "not valid JSON"),
        (b'{"payload": {"exposure_id": 1, "detector": "R22_S11"}}', "message_id: Field required"),
        (b'{"message_id": "../etc", "payload": {"exposure_id": 1, "detector": "R22_S11"}}',
         "message_id: String should match pattern"),
        (b'{"message_id": "m", "payload": {"exposure_id": 1, "detector": "R22_S11"}, "x": 1}',
         "x: Extra inputs are not permitted"),
        (b'[1, 2]', "Input should be an object"),
    ],
)  # fmt: skip
async def test_422_malformed_bodies(http: Http, tokens: Tokens, body: bytes, why: str) -> None:
    r = await http(tokens.prompt).post(
        IQ, content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert why in error_of(r)["message"]


async def test_422_per_topic_rules(http: Http, tokens: Tokens) -> None:
    qa = dict(EXAMPLES["calibrationQA"])
    r = await http(tokens.prompt).post(
        "/topics/calibrationQA/messages", json=message("q", {**qa, "read_noise_e_C10": "6"})
    )
    assert r.status_code == 422
    assert "payload.read_noise_e_C10" in error_of(r)["message"]
    r = await http(tokens.prompt).post(
        "/topics/calibrationQA/messages", json=message("q", {**qa, "gain_C10": 1.7})
    )
    assert r.status_code == 422
    assert "unknown field 'gain_C10'" in error_of(r)["message"]
    job = dict(EXAMPLES["batchJobResult"])
    for change, why in (
        ({"started_at": "2026-11-22T10:00:00"}, "timezone"),
        ({"finished_at": "2026-11-22T09:00:00Z"}, "finished_at is before started_at"),
        ({"status": "done"}, "payload.status"),
        ({"counts": {"quanta": -1}}, "payload.counts.quanta"),
    ):
        r = await http(tokens.batch).post(
            "/topics/batchJobResult/messages", json=message("j", {**job, **change})
        )
        assert r.status_code == 422, change
        assert why in error_of(r)["message"], r.text


async def test_409_same_id_other_payload(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    client = http(tokens.prompt)
    assert (await client.post(IQ, json=message("iq-1", image_quality()))).status_code == 201
    r = await client.post(IQ, json=message("iq-1", image_quality(seeing_arcsec=1.4)))
    assert r.status_code == 409
    assert error_of(r)["code"] == "duplicate_conflict"
    assert gateway.store.messages()[0].payload["seeing_arcsec"] == 0.82
    assert [a.status for a in gateway.audit()] == [409, 201]


async def test_413_by_content_length_and_by_bytes_read(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    limit = gateway.policy.max_body_bytes
    big = message("big", image_quality(band="r" * (limit + 10)))
    client = http(tokens.prompt)
    r = await client.post(IQ, json=big)
    assert r.status_code == 413
    sent = int(r.request.headers["content-length"])
    assert sent > limit
    assert error_of(r)["message"] == f"body of {sent} bytes; at most {limit}"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = await client.post(IQ, content=chunks())
    assert r.status_code == 413
    assert error_of(r)["message"] == f"body larger than {limit} bytes"
    r = await client.post(IQ, content=b"{}", headers={"Content-Length": "x"})
    assert r.status_code in (400, 413)
    assert gateway.store.messages() == []
    assert {a.status for a in gateway.audit()} <= {400, 413}


async def test_413_for_one_payload_of_a_batch(tokens: Tokens, settings: Any) -> None:
    small = make_settings(settings.home)
    small.policies.telemetry.max_body_bytes = 256
    small.policies.telemetry.max_batch_messages = 3
    with TelemetryGateway.open(small) as gw:
        gw.state = State.ENABLED
        transport = httpx.ASGITransport(create_app(gw))
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://gw/telemetry/v1",
            headers={"Authorization": f"Bearer {tokens.prompt}"},
        ) as client:
            r = await client.post(
                "/topics/imageQuality/batches",
                json={"messages": [message("a", image_quality())]},
            )
            assert r.status_code == 413
            assert "payload of a is" in error_of(r)["message"]
            r = await client.post(
                "/topics/imageQuality/batches",
                json={
                    "messages": [
                        message(f"m{i}", {"exposure_id": i, "detector": "R22_S11"})
                        for i in range(4)
                    ]
                },
            )
            assert r.status_code == 413
            assert "batch of 4 messages; at most 3" in error_of(r)["message"]
            assert gw.store.messages() == []


async def test_503_while_disabled(http: Http, tokens: Tokens, gateway: TelemetryGateway) -> None:
    gateway.state = State.DISABLED
    r = await http(tokens.prompt).post(IQ, json=message("m", image_quality()))
    assert r.status_code == 503
    assert error_of(r) == {
        "code": "unavailable",
        "message": "TelemetryGateway is DISABLED: not accepting telemetry now; Operations "
        "enable it (ldf ocs command TelemetryGateway enable)",
    }
    # Reads still work; the refusal is audited.
    assert (await http(tokens.prompt).get("/topics")).status_code == 200
    assert [(a.status, a.outcome) for a in gateway.audit()] == [(503, "rejected")]
    health = (await http(None).get("http://gateway/health")).json()
    assert (health["state"], health["accepting"]) == ("DISABLED", False)


async def test_batches_are_all_or_nothing(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    client = http(tokens.prompt)
    path = "/topics/imageQuality/batches"
    batch = {"messages": [message(f"m{i}", image_quality(detector=f"R22_S1{i}")) for i in range(3)]}
    r = await client.post(path, json=batch)
    assert r.status_code == 201, r.text
    assert (r.json()["accepted"], r.json()["duplicates"]) == (3, 0)
    assert [x["seq"] for x in r.json()["results"]] == [1, 2, 3]
    # A batch with one old and one new message: 201, one duplicate.
    r = await client.post(
        path, json={"messages": [batch["messages"][0], message("m9", image_quality())]}
    )
    assert (r.status_code, r.json()["accepted"], r.json()["duplicates"]) == (201, 1, 1)
    # All duplicates: 200.
    assert (await client.post(path, json=batch)).status_code == 200
    # One bad message: nothing of the batch is stored; the path has the index.
    bad = {"messages": [message("n1", image_quality()), message("n2", image_quality(psf_e1="x"))]}
    r = await client.post(path, json=bad)
    assert r.status_code == 422
    assert error_of(r)["message"].startswith("imageQuality batch: messages.1.payload.psf_e1:")
    conflict = {
        "messages": [message("n1", image_quality()), message("m0", image_quality(psf_e1=0.5))]
    }
    assert (await client.post(path, json=conflict)).status_code == 409
    assert sorted(m.message_id for m in gateway.store.messages()) == ["m0", "m1", "m2", "m9"]
    assert (await client.post(path, json={"messages": []})).status_code == 422


async def test_topics_and_schemas(http: Http, tokens: Tokens) -> None:
    client = http(tokens.batch)
    topics = (await client.get("/topics")).json()
    assert [t["name"] for t in topics] == list(TOPICS)
    for name in TOPICS:
        r = await client.get(f"/topics/{name}/schema")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/schema+json")
        schema = r.json()
        assert schema["title"] == name
        assert schema["additionalProperties"] is False
        assert set(schema["examples"][0]) <= set(schema["properties"]) | (
            {k for k in schema["examples"][0] if k.startswith(("read_noise_e_", "overscan_"))}
        )
    iq = (await client.get("/topics/imageQuality/schema")).json()
    assert iq["required"] == ["exposure_id", "detector"]
    assert iq["properties"]["seeing_arcsec"]["anyOf"] == [{"type": "number"}, {"type": "null"}]
    qa = (await client.get("/topics/calibrationQA/schema")).json()
    assert list(qa["patternProperties"]) == [
        "^(?:overscan_noise_adu|read_noise_e)_[A-Za-z0-9]{1,8}$"
    ]


async def test_status_and_audit_for_operators(
    http: Http, tokens: Tokens, gateway: TelemetryGateway
) -> None:
    await http(tokens.prompt).post(IQ, json=message("a", image_quality()))
    await http(tokens.prompt).post(IQ, json=message("a", image_quality()))
    await http(tokens.prompt).post(IQ, json=message("b", image_quality(psf_e1="x")))
    await http("stolen").post(IQ, json=message("c", image_quality()))
    ops = http(tokens.ops)
    st = (await ops.get("/status")).json()
    assert (st["state"], st["accepting"], st["backlog"]) == ("ENABLED", True, 1)
    assert st["rejected_unauthenticated"] == 1
    (p,) = st["producers"]
    assert (p["producer"], p["device"], p["accepted"], p["duplicates"], p["rejected"]) == (
        "prompt", "MTPrompt", 1, 1, 1,
    )  # fmt: skip
    assert (p["backlog"], p["injected"], p["failing"]) == (1, 0, False)
    rows = (await ops.get("/audit", params={"producer": "prompt", "limit": 2})).json()
    assert [(r["outcome"], r["message_id"]) for r in rows] == [
        ("rejected", "b"),
        ("duplicate", "a"),
    ]
    assert (await ops.get("/audit", params={"outcome": "lost"})).status_code == 400
    assert (await ops.get("/audit", params={"limit": 0})).status_code == 400


async def test_producers_file_changes_apply_at_once(
    http: Http, tokens: Tokens, settings: Any
) -> None:
    pf = ProducerFile(producers_path(settings))
    client = http(tokens.prompt)
    assert (await client.get("/topics")).status_code == 200
    new = pf.rotate("prompt")
    assert (await client.get("/topics")).status_code == 401
    assert (await http(new).get("/topics")).status_code == 200
    pf.remove("prompt")
    assert (await http(new).get("/topics")).status_code == 401


async def test_a_broken_producers_file_is_a_server_error(
    http: Http, tokens: Tokens, settings: Any
) -> None:
    producers_path(settings).write_text("producers: [{name: x, topics: [nope]}]\n")
    r = await http(tokens.prompt).get("/topics")
    assert r.status_code == 500
    assert error_of(r)["code"] == "invalid_config"
    assert "producers[0]" in error_of(r)["message"]
