"""The mini-broker on SQLite and PostgreSQL: filters, matching, per-visit limits, manifests,
restarts, kill -9 of the matcher, the 100-user limit and the HTTP routes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldf import expr
from ldf.alerts import formats
from ldf.alerts.auth import Role
from ldf.alerts.client import AlertClient
from ldf.alerts.filters import FilterLimitError, decode_for_match, filter_fields, match_packets
from ldf.alerts.minibroker import FULL_PER_VISIT, MAX_USERS, MiniBroker
from ldf.alerts.models import Delivery, FeedSpec, manifest_checksum
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
from ldf.alerts.synthetic import alert_id_for, make_alert
from ldf.errors import NotFoundError, StateError, UserInputError
from ldf.pipelines.alertpacket import AlertSchema
from tests.alerts.conftest import VISIT, Served

ROOT = Path(__file__).resolve().parents[2]
BANDS = ("u", "g", "r", "i", "z", "y")


def fields(visit: int, index: int) -> dict[str, Any]:
    """The DiaSource fields the tests vary: a deterministic spread of S/N, band, reliability."""
    return {
        "snr": float((index * 7) % 25),
        "band": BANDS[index % 6],
        "reliability": None if index % 5 == 0 else (index % 10) / 10,
    }


@lru_cache(maxsize=512)
def packet(visit: int, index: int) -> bytes:
    """A small alert whose DiaSource has :func:`fields`; alert ids as `alert_id_for`."""
    schema = AlertSchema.latest()
    alert = make_alert(visit, index, n_previous=index % 4, cutout_side=30, schema=schema)
    alert["diaSource"].update(fields(visit, index))
    alert["diaObject"]["nDiaSources"] = 1 + index % 4
    return schema.serialize(alert)


def visit_packets(visit: int, count: int, start: int = 0) -> list[bytes]:
    return [packet(visit, i) for i in range(start, start + count)]


def drain(service: AlertService, feed: str) -> list[Delivery]:
    out: list[Delivery] = []
    while batch := service.fetch(feed, max_entries=50):
        out += batch
        service.ack(feed, batch[-1].position)
    return out


def catch_up(broker: MiniBroker) -> None:
    while broker.run_once().entries:
        pass


def alert_ids(entries: list[Delivery]) -> list[int]:
    return [e.alert_id for e in entries if e.kind == "alert" and e.alert_id is not None]


def manifests(entries: list[Delivery]) -> list[dict[str, Any]]:
    return [json.loads(e.body) for e in entries if e.kind == "manifest"]


# -- filters --------------------------------------------------------------------------------


def test_bad_filters_point_at_the_offending_token(service: AlertService) -> None:
    broker = MiniBroker(service)
    with pytest.raises(UserInputError) as err:
        broker.register("jdoe", "bright", "snr > > 10")
    lines = str(err.value).splitlines()
    assert lines[0] == "bad expression at column 7: unexpected '>'"
    assert lines[1].strip() == "snr > > 10"
    assert lines[2].index("^") - lines[1].index("s") == 6  # under the second '>'
    with pytest.raises(UserInputError, match=r"unknown field 'diaSource\.snrr'; did you mean "):
        broker.register("jdoe", "bright", "diaSource.snrr > 10")
    with pytest.raises(UserInputError, match="unexpected end of expression"):
        broker.register("jdoe", "bright", "band in ('g', 'r'")
    with pytest.raises(UserInputError, match="unexpected character ';'"):
        broker.register("jdoe", "bright", "snr > 10; import os")
    with pytest.raises(UserInputError, match="at most 2000"):
        broker.register("jdoe", "bright", "snr > 1 or " * 200 + "snr > 2")
    for bad in ("", "a-b", "x" * 33, "../etc"):
        with pytest.raises(UserInputError, match="filter name"):
            broker.register("jdoe", bad, "snr > 10")
    with pytest.raises(UserInputError, match="at most 64 characters"):
        broker.register("u" * 40, "n" * 25, "snr > 10")
    # Nothing of a refused filter is left behind.
    assert broker.filters() == []
    assert service.feeds() == []


def test_fields_come_from_the_alert_schema() -> None:
    names = filter_fields()
    for name in ("diaSource.snr", "diaSource.band", "diaObject.ra", "ssSource.ssObjectId",
                 "band", "snr", "ra", "dec", "visit", "reliability", "diaObject.nDiaSources",
                 "observation_reason", "ssSource"):  # fmt: skip
        assert name in names
    # Arrays and bytes are not filterable.
    assert "prvDiaSources" not in names
    assert "cutoutDifference" not in names
    record = decode_for_match(packet(VISIT, 3), frozenset({"diaSource"}))
    assert record["snr"] == record["diaSource"]["snr"] == 21.0
    assert record["band"] == "i"
    assert record["alertId"] == alert_id_for(VISIT, 3)
    assert "diaObject" not in record  # decoded only as far as asked
    whole = decode_for_match(packet(VISIT, 3), frozenset({"cutoutTemplate"}))
    assert whole["diaObject"]["nDiaSources"] == 4


PROPERTY_FILTERS = (
    "snr > 10 and band in ('g','r')",
    "not reliability >= 0.5 or band is null",
    "diaSource.psfFlux < 3000 and ra > 180",
    "band not in ('u', 'y') and diaObjectId is not null",
    "snr",
    "diaObject.ra >= 0 and diaObject.nDiaSources >= 2",
)


@settings(max_examples=60, deadline=None)
@given(
    snr=st.one_of(st.none(), st.floats(-5, 50)),
    band=st.one_of(st.none(), st.sampled_from(BANDS)),
    reliability=st.one_of(st.none(), st.floats(0, 1)),
    index=st.integers(0, 99),
)
def test_reading_a_prefix_never_changes_a_match(
    snr: float | None, band: str | None, reliability: float | None, index: int
) -> None:
    schema = AlertSchema.latest()
    alert = make_alert(VISIT, index, n_previous=index % 3, cutout_side=8, schema=schema)
    alert["diaSource"].update(snr=snr, band=band, reliability=reliability)
    data = schema.serialize(alert)
    whole = decode_for_match(data, frozenset({"cutoutTemplate"}))  # formats.decode
    want = [i for i, t in enumerate(PROPERTY_FILTERS) if expr.parse(t).matches(whole)]
    for texts in (PROPERTY_FILTERS[:4], PROPERTY_FILTERS):  # head only; through diaObject
        ((_pos, got),) = match_packets(texts, [(1, data)])
        assert got == [i for i in want if i < len(texts)]


def test_register_list_delete(service: AlertService) -> None:
    broker = MiniBroker(service)
    flt = broker.register("jdoe", "bright", "snr > 10 and band in ('g','r')")
    assert flt.feed == "user-jdoe-bright"
    feed = service.feed(flt.feed)
    assert (feed.broker, feed.live) == ("jdoe", False)
    broker.register("jdoe", "red", "band == 'r'")
    broker.register("asmith", "all", "true")
    assert [f.name for f in broker.filters("jdoe")] == ["bright", "red"]
    assert broker.users() == ["asmith", "jdoe"]
    with pytest.raises(StateError, match="has a filter 'bright'"):
        broker.register("jdoe", "bright", "snr > 5")
    broker.delete("jdoe", "bright")
    with pytest.raises(NotFoundError):
        service.feed("user-jdoe-bright")
    with pytest.raises(NotFoundError, match="no filter 'bright'"):
        broker.delete("jdoe", "bright")
    assert [f.name for f in broker.filters("jdoe")] == ["red"]
    # A feed left by a crash between creating it and storing its filter is started afresh.
    service.create_feed(FeedSpec(name="user-carol-x", broker="carol", live=False))
    assert broker.register("carol", "x", "true").feed == "user-carol-x"
    # Another party's feed of the same name is never taken over.
    service.create_feed(FeedSpec(name="user-bob-x", broker="fink"))
    with pytest.raises(StateError, match="belongs to fink"):
        broker.register("bob", "x", "true")
    assert broker.filters("bob") == []


def test_the_101st_user_is_refused(service: AlertService) -> None:
    broker = MiniBroker(service)
    for i in range(MAX_USERS):
        broker.register(f"user{i:03d}", "f", "snr > 10")
    with pytest.raises(FilterLimitError, match="at most 100 users at once"):
        broker.register("latecomer", "f", "snr > 10")
    with pytest.raises(NotFoundError):  # its feed was not kept
        service.feed("user-latecomer-f")
    broker.register("user000", "g", "band == 'g'")  # a second filter of a present user is fine
    broker.delete("user001", "f")
    broker.register("latecomer", "f", "snr > 10")
    assert len(broker.users()) == MAX_USERS
    assert broker.status()["users"] == MAX_USERS


def test_filters_per_user_are_bounded(service: AlertService) -> None:
    broker = MiniBroker(service, max_filters_per_user=2)
    broker.register("jdoe", "a", "true")
    broker.register("jdoe", "b", "true")
    with pytest.raises(FilterLimitError, match="jdoe has 2 filters"):
        broker.register("jdoe", "c", "true")


# -- matching -------------------------------------------------------------------------------


FILTERS = {
    ("jdoe", "bright_gr"): ("snr > 10 and band in ('g','r')",
                            lambda f: f["snr"] > 10 and f["band"] in ("g", "r")),
    ("jdoe", "faint"): ("diaSource.snr <= 3", lambda f: f["snr"] <= 3),
    ("asmith", "reliable"): ("reliability >= 0.5 and not band == 'u'",
                             lambda f: f["reliability"] is not None and f["reliability"] >= 0.5
                             and f["band"] != "u"),
    ("asmith", "no_rb"): ("reliability is null", lambda f: f["reliability"] is None),
    ("bob", "history"): ("diaObject.ra >= 0 and diaObject.nDiaSources >= 3 and band like '[gri]'",
                         None),
    ("carol", "nothing"): ("ssSource is not null", lambda f: False),
}  # fmt: skip


def test_matching_on_synthetic_alerts(service: AlertService) -> None:
    broker = MiniBroker(service, batch_entries=13)
    for (user, name), (text, _) in FILTERS.items():
        broker.register(user, name, text)
    visits = {VISIT: 40, VISIT + 1: 25}
    for visit, n in visits.items():
        service.ingest(visit_packets(visit, n))
        service.close_visit(visit)
    catch_up(broker)
    for (user, name), (_text, want) in FILTERS.items():
        got = drain(service, f"user-{user}-{name}")
        expected = []
        for visit, n in visits.items():
            for i in range(n):
                f = fields(visit, i)
                hit = (
                    want(f) if want is not None
                    else (1 + i % 4) >= 3 and f["band"] in ("g", "r", "i")
                )  # fmt: skip
                if hit:
                    expected.append(alert_id_for(visit, i))
        assert alert_ids(got) == expected, name
        # One manifest per visit per filter, after that visit's alerts, even when empty.
        ms = manifests(got)
        assert [m["visit"] for m in ms] == list(visits)
        for m in ms:
            ids = [a for a in expected if a // 100_000 == m["visit"]]
            assert (m["count"], m["checksum"]) == (len(ids), manifest_checksum(ids))
            assert m["feed"] == f"user-{user}-{name}"
    assert broker.status()["backlog"] == 0
    assert broker.status()["alerts"] == 65


def test_first_twenty_full_then_notifications_per_user_and_visit(service: AlertService) -> None:
    broker = MiniBroker(service, batch_entries=9)
    broker.register("jdoe", "all", "true")
    broker.register("jdoe", "bright", "snr >= 12")  # shares jdoe's 20 full alerts
    broker.register("asmith", "all", "true")  # counted apart
    service.ingest(visit_packets(VISIT, 30))
    service.ingest(visit_packets(VISIT + 1, 5))
    catch_up(broker)
    jdoe_all = drain(service, "user-jdoe-all")
    jdoe_bright = drain(service, "user-jdoe-bright")
    asmith = drain(service, "user-asmith-all")
    # asmith: 20 full, then 10 notifications of the first visit; the next visit starts afresh.
    assert [e.format for e in asmith] == ["full"] * 20 + ["notification"] * 10 + ["full"] * 5
    # jdoe: its two feeds share one count, in log order.
    merged = sorted(jdoe_all + jdoe_bright, key=lambda e: e.position)
    first = [e for e in merged if e.visit == VISIT]
    assert [e.format for e in first] == ["full"] * FULL_PER_VISIT + ["notification"] * (
        len(first) - FULL_PER_VISIT
    )
    assert all(e.format == "full" for e in merged if e.visit == VISIT + 1)
    full, note = first[0], first[-1]
    assert formats.decode(full.body)[1]["diaSourceId"] == full.alert_id
    assert full.body == service.get_alert(full.alert_id or 0)
    body = json.loads(note.body)
    assert body["alertId"] == note.alert_id
    assert body["url"] == f"/alerts/v1/alerts/{note.alert_id}"
    usage = broker.usage("jdoe", VISIT)
    assert usage["full"] == FULL_PER_VISIT
    assert sum(f["matched"] for f in usage["filters"]) == len(first)


def test_counts_and_cursor_survive_a_restart(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "alerts"
    service = AlertService(AlertStore.open(store_url), root)
    broker = MiniBroker(service, batch_entries=4)
    broker.register("jdoe", "all", "true")
    service.ingest(visit_packets(VISIT, 15))
    catch_up(broker)
    service.close()
    # A new process: new service, new mini-broker, same database and log.
    service = AlertService(AlertStore.open(store_url), root)
    broker = MiniBroker(service, batch_entries=4)
    assert broker.status()["backlog"] == 0
    service.ingest(visit_packets(VISIT, 15, start=15))
    service.close_visit(VISIT)
    catch_up(broker)
    got = drain(service, "user-jdoe-all")
    service.close()
    assert alert_ids(got) == [alert_id_for(VISIT, i) for i in range(30)]
    assert [e.format for e in got if e.kind == "alert"] == ["full"] * 20 + ["notification"] * 10
    (m,) = manifests(got)
    assert m["count"] == 30


def test_filters_see_only_what_comes_after_them(service: AlertService) -> None:
    broker = MiniBroker(service)
    broker.register("early", "all", "true")
    service.ingest(visit_packets(VISIT, 5))
    broker.register("late", "all", "true")  # the matcher has not run yet
    service.ingest(visit_packets(VISIT, 5, start=5))
    service.close_visit(VISIT)
    catch_up(broker)
    assert len(alert_ids(drain(service, "user-early-all"))) == 10
    late = drain(service, "user-late-all")
    assert alert_ids(late) == [alert_id_for(VISIT, i) for i in range(5, 10)]
    assert manifests(late)[0]["count"] == 5
    # A deleted filter gets nothing more; registered again, it starts afresh.
    broker.delete("early", "all")
    service.ingest(visit_packets(VISIT + 1, 3))
    catch_up(broker)
    broker.register("early", "all", "true")
    assert drain(service, "user-early-all") == []
    service.ingest(visit_packets(VISIT + 1, 2, start=3))
    service.close_visit(VISIT + 1)
    catch_up(broker)
    again = drain(service, "user-early-all")
    assert alert_ids(again) == [alert_id_for(VISIT + 1, i) for i in (3, 4)]
    assert manifests(again)[0]["count"] == 2


def test_late_alerts_give_a_new_manifest_revision(service: AlertService) -> None:
    broker = MiniBroker(service)
    broker.register("jdoe", "all", "true")
    service.ingest(visit_packets(VISIT, 4))
    service.close_visit(VISIT)
    service.ingest(visit_packets(VISIT, 2, start=4))  # late: revision 2
    catch_up(broker)
    ms = manifests(drain(service, "user-jdoe-all"))
    assert [(m["revision"], m["count"]) for m in ms] == [(1, 4), (2, 6)]


def test_a_corrupt_alert_is_skipped_and_counted(service: AlertService) -> None:
    broker = MiniBroker(service)
    broker.register("jdoe", "objects", "diaObject.ra >= 0")
    broker.register("jdoe", "bright", "snr >= 0")
    good = packet(VISIT, 3)
    # The head (what ingest checks) is intact; the DiaSource history is cut short.
    head = len(good) - 30_000 if len(good) > 40_000 else 700
    service.ingest([good[:head], packet(VISIT, 4)])
    catch_up(broker)
    # Each alert is decoded once, as far as the filters need: the cut one is skipped for all.
    assert alert_ids(drain(service, "user-jdoe-objects")) == [alert_id_for(VISIT, 4)]
    assert alert_ids(drain(service, "user-jdoe-bright")) == [alert_id_for(VISIT, 4)]
    assert broker.status()["errors"] == 1
    assert broker.status()["backlog"] == 0


def test_two_matchers_never_append_a_batch_twice(service: AlertService) -> None:
    a = MiniBroker(service, batch_entries=5)
    b = MiniBroker(service, batch_entries=5)
    a.register("jdoe", "all", "true")
    service.ingest(visit_packets(VISIT, 40))
    service.close_visit(VISIT)
    errors: list[BaseException] = []

    def work(broker: MiniBroker) -> None:
        try:
            catch_up(broker)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = drain(service, "user-jdoe-all")
    assert alert_ids(got) == [alert_id_for(VISIT, i) for i in range(40)]
    assert len(manifests(got)) == 1


# -- kill -9 --------------------------------------------------------------------------------

MATCHER = """
import sys
from pathlib import Path
from ldf.alerts.minibroker import MiniBroker
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore
broker = MiniBroker(AlertService(AlertStore.open(sys.argv[1]), Path(sys.argv[2])), batch_entries=3)
print("ready", flush=True)
while broker.run_once().entries:
    print("pass", flush=True)
print("done", flush=True)
"""


def test_matcher_killed_mid_run_delivers_each_match_once(store_url: str, tmp_path: Path) -> None:
    root = tmp_path / "alerts"
    service = AlertService(AlertStore.open(store_url), root)
    broker = MiniBroker(service)
    users = {"u1": "true", "u2": "snr > 10", "u3": "band in ('g','r')", "u4": "snr < 0"}
    for user, text in users.items():
        broker.register(user, "f", text)
    visits = [VISIT, VISIT + 1, VISIT + 2]
    for visit in visits:
        service.ingest(visit_packets(visit, 30))
        service.close_visit(visit)
    total = broker.status()["backlog"]
    proc = subprocess.Popen(
        [sys.executable, "-c", MATCHER, store_url, str(root)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert proc.stdout.readline().strip() == "pass"
        os.kill(proc.pid, signal.SIGKILL)  # somewhere in its second pass
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert 0 < total - broker.status()["backlog"] < total  # killed mid-run
    # The restart: from the stored cursor.
    catch_up(broker)
    for user, text in users.items():
        got = drain(service, f"user-{user}-f")
        ids = alert_ids(got)
        assert len(ids) == len(set(ids)), f"{user} got duplicates"
        expected = [
            alert_id_for(v, i)
            for v in visits
            for i in range(30)
            if broker.validate(text).matches(
                decode_for_match(packet(v, i), frozenset({"diaSource"}))
            )
        ]
        assert ids == expected, user
        per_visit = Counter(m["visit"] for m in manifests(got))
        assert per_visit == dict.fromkeys(visits, 1)
    service.close()


# -- HTTP -----------------------------------------------------------------------------------


def test_http_filters(served: Served) -> None:
    url = f"{served.url}/alerts/v1/filters"
    jdoe = {"Authorization": f"Bearer {served.credentials.add('jdoe', Role.USER)}"}
    eve = {"Authorization": f"Bearer {served.credentials.add('eve', Role.USER)}"}
    ops = {"Authorization": f"Bearer {served.tokens['ops']}"}
    fink = {"Authorization": f"Bearer {served.tokens['fink']}"}
    r = httpx.post(url, json={"name": "bright", "expression": "snr >> 10"}, headers=jdoe)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.splitlines()[1:] == ["  snr >> 10", "       ^"]
    r = httpx.post(url, json={"name": "bright", "expression": "snr > 10"}, headers=fink)
    assert r.status_code == 403
    r = httpx.post(url, json={"name": "b", "expression": "true", "user": "eve"}, headers=jdoe)
    assert r.status_code == 403
    r = httpx.post(url, json={"name": "bright", "expression": "snr > 10"}, headers=jdoe)
    assert r.status_code == 201, r.text
    assert r.json()["feed"] == "user-jdoe-bright"
    r = httpx.post(url, json={"name": "bright", "expression": "snr > 1"}, headers=jdoe)
    assert r.status_code == 409
    r = httpx.post(url, json={"name": "all", "expression": "true", "user": "eve"}, headers=ops)
    assert r.status_code == 201
    assert [f["name"] for f in httpx.get(url, headers=jdoe).json()] == ["bright"]
    assert [f["user"] for f in httpx.get(url, headers=ops).json()] == ["jdoe", "eve"]
    assert httpx.get(f"{url}/bright", headers=jdoe).json()["expression"] == "snr > 10"
    assert httpx.get(f"{url}/bright", headers=eve).status_code == 404
    # The user reads its stream with the feed routes; nobody else may.
    with AlertClient(served.url, served.tokens["prompt"]) as prompt:
        prompt.ingest(visit_packets(VISIT, 20))
        prompt.close_visit(VISIT)
    catch_up(MiniBroker(served.service))
    token = jdoe["Authorization"].split()[1]
    with AlertClient(served.url, token) as client:
        assert [f["name"] for f in client.feeds()] == ["user-jdoe-bright"]
        got = client.entries("user-jdoe-bright", after=None)
        want = [alert_id_for(VISIT, i) for i in range(20) if fields(VISIT, i)["snr"] > 10]
        assert [e.alert_id for e in got if e.kind == "alert"] == want
        assert json.loads(got[-1].body)["count"] == len(want)
        client.ack("user-jdoe-bright", got[-1].position)
    r = httpx.get(f"{served.url}/alerts/v1/feeds/user-jdoe-bright/entries", headers=eve)
    assert r.status_code == 403
    assert httpx.delete(f"{url}/bright", headers=eve).status_code == 404
    assert httpx.delete(f"{url}/bright", headers=jdoe).status_code == 204
    assert httpx.get(url, headers=jdoe).json() == []


def test_worker_processes_match_what_one_process_does(tmp_path: Path) -> None:
    results = []
    for workers in (0, 2):
        service = AlertService(
            AlertStore.open(f"sqlite:///{tmp_path / f'w{workers}.sqlite3'}"),
            tmp_path / f"alerts-{workers}",
        )
        broker = MiniBroker(service, batch_entries=20, workers=workers)
        for (user, name), (text, _) in FILTERS.items():
            broker.register(user, name, text)
        service.ingest(visit_packets(VISIT, 40))
        service.close_visit(VISIT)
        catch_up(broker)
        broker.close()
        results.append(
            {
                feed: [(e.kind, e.alert_id, e.format) for e in drain(service, feed)]
                for feed in (f"user-{u}-{n}" for u, n in FILTERS)
            }
        )
        service.close()
    assert results[0] == results[1]
    assert sum(len(v) for v in results[0].values()) > 40
