"""The gateway's store on SQLite and PostgreSQL: one contract, both engines."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ldf.db import utcnow
from ldf.telemetry.errors import DuplicateConflictError
from ldf.telemetry.models import Incoming, canonical_json, payload_digest
from ldf.telemetry.storage import GatewayStore
from tests.telemetry.conftest import image_quality, make_settings


def incoming(mid: str, **over: object) -> Incoming:
    payload = image_quality(**over)  # type: ignore[arg-type]
    canonical = canonical_json(payload)
    return Incoming(mid, payload, canonical, payload_digest(canonical))


@pytest.fixture
def store(_isolated_home: Path, databases: dict[str, str]) -> Iterator[GatewayStore]:
    s = GatewayStore.open(make_settings(_isolated_home, databases).database_url("telemetry"))
    yield s
    s.close()


def accept(store: GatewayStore, producer: str, *msgs: Incoming, device: str = "MTPrompt"):  # type: ignore[no-untyped-def]
    return store.accept(producer, device, "imageQuality", list(msgs), now=utcnow(), client="c")


def test_accept_numbers_each_producer_in_order(store: GatewayStore) -> None:
    a = accept(store, "p1", incoming("a1"), incoming("a2", detector="R22_S12"))
    b = accept(store, "p2", incoming("b1"))
    c = accept(store, "p1", incoming("a3", detector="R22_S21"))
    assert [(r.message_id, r.status, r.seq) for r in a + b + c] == [
        ("a1", "accepted", 1), ("a2", "accepted", 2), ("b1", "accepted", 1), ("a3", "accepted", 3),
    ]  # fmt: skip
    assert a[0].bus_topic == "ocs.MTPrompt.tel.imageQuality"
    pending = store.pending("p1")
    assert [(m.seq, m.message_id, m.state) for m in pending] == [
        (1, "a1", "pending"), (2, "a2", "pending"), (3, "a3", "pending"),
    ]  # fmt: skip
    assert pending[1].payload == image_quality(detector="R22_S12")
    assert store.pending_producers() == ["p1", "p2"]
    assert store.counts() == {"pending": 4}


def test_same_id_same_payload_is_a_duplicate_stored_once(store: GatewayStore) -> None:
    first = accept(store, "p1", incoming("a1"))[0]
    again = accept(store, "p1", incoming("a1"))[0]
    assert (again.status, again.seq, again.received_at) == ("duplicate", 1, first.received_at)
    # The same id from another producer is another message.
    assert accept(store, "p2", incoming("a1"))[0].status == "accepted"
    assert len(store.messages("p1")) == 1
    st = {s.producer: s for s in store.status()}
    assert (st["p1"].accepted, st["p1"].duplicates, st["p1"].backlog) == (1, 1, 1)


def test_same_id_other_payload_conflicts_and_rolls_back_the_request(store: GatewayStore) -> None:
    accept(store, "p1", incoming("a1"))
    with pytest.raises(DuplicateConflictError, match="'a1' of p1 was used before with another"):
        accept(store, "p1", incoming("new"), incoming("a1", seeing_arcsec=2.0))
    assert [m.message_id for m in store.messages("p1")] == ["a1"]  # 'new' was not kept
    # Within one request too: the second copy differs.
    with pytest.raises(DuplicateConflictError):
        accept(store, "p1", incoming("x"), incoming("x", seeing_arcsec=3.0))
    # An identical repeat within one request is a duplicate of the first.
    got = accept(store, "p1", incoming("y"), incoming("y"))
    assert [(r.status, r.seq) for r in got] == [("accepted", 2), ("duplicate", 2)]
    assert next(s for s in store.status() if s.producer == "p1").accepted == 2


def test_mark_injected_and_the_audit_trail(store: GatewayStore) -> None:
    accept(store, "p1", incoming("a1"), incoming("a2", detector="R22_S12"))
    accept(store, "p1", incoming("a1"))
    store.reject(
        now=utcnow(), producer=None, topic="imageQuality", message_id=None, status=401,
        reason="unauthorized: invalid bearer token", client="10.0.0.9",
    )  # fmt: skip
    store.reject(
        now=utcnow(), producer="p1", topic="imageQuality", message_id="bad", status=422,
        reason="schema_violation: payload.seeing_arcsec: Input should be a valid number",
    )  # fmt: skip
    first = store.pending("p1", limit=1)
    at = utcnow()
    assert store.mark_injected("p1", [first[0].id], at) == 1
    assert store.mark_injected("p1", [first[0].id], at) == 0  # already injected: not counted
    assert [m.message_id for m in store.pending("p1")] == ["a2"]

    rows = store.audit()
    assert [(r.producer, r.outcome, r.status, r.message_id) for r in rows] == [
        ("p1", "rejected", 422, "bad"),
        ("unauthenticated", "rejected", 401, None),
        ("p1", "duplicate", 200, "a1"),
        ("p1", "accepted", 201, "a2"),
        ("p1", "accepted", 201, "a1"),
    ]
    injected = {(r.message_id, r.outcome): r.injected_at for r in rows}
    assert injected[("a1", "accepted")] == at
    assert injected[("a1", "duplicate")] == at  # the duplicate points at the stored message
    assert injected[("a2", "accepted")] is None
    assert rows[1].client == "10.0.0.9"
    assert [r.outcome for r in store.audit(producer="p1", outcome="rejected")] == ["rejected"]
    assert [r.id for r in store.audit(before_id=rows[1].id, limit=2)] == [rows[2].id, rows[3].id]
    assert store.rejected_unauthenticated() == 1

    (st,) = store.status()
    assert (st.accepted, st.duplicates, st.rejected, st.injected, st.backlog) == (2, 1, 1, 1, 1)
    assert st.last_injected_at == at
    assert st.oldest_pending_at is not None
    assert not st.failing
    store.injection_failed("p1", "TransportError: bus down", utcnow())
    (st,) = store.status()
    assert st.failing
    assert (st.injection_errors, st.last_error) == (1, "TransportError: bus down")


def test_purge_keeps_pending_messages(store: GatewayStore) -> None:
    accept(store, "p1", incoming("a1"), incoming("a2", detector="R22_S12"))
    store.mark_injected("p1", [store.pending("p1", limit=1)[0].id], utcnow())
    assert store.purge(utcnow() - timedelta(days=1)) == (0, 0)
    assert store.purge(utcnow() + timedelta(seconds=1)) == (1, 2)
    assert [m.message_id for m in store.messages()] == ["a2"]
    assert store.audit() == []
    # The producer's numbering goes on after a purge.
    assert accept(store, "p1", incoming("a3", detector="R22_S21"))[0].seq == 3


def test_concurrent_requests_of_one_producer_get_distinct_ordered_numbers(
    store: GatewayStore,
) -> None:
    errors: list[BaseException] = []

    def send(k: int) -> None:
        try:
            for i in range(10):
                accept(store, "p1", incoming(f"t{k}-{i}", detector=f"R{k}{i}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    messages = store.messages("p1")
    assert [m.seq for m in messages] == list(range(1, 41))
    # Each thread's own messages keep their order.
    for k in range(4):
        mine = [
            int(m.message_id.split("-")[1]) for m in messages if m.message_id.startswith(f"t{k}-")
        ]
        assert mine == list(range(10))
