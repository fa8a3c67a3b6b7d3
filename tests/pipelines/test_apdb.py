"""The APDB on dax_apdb: schema creation, store/history, and never losing DiaSources."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.time import Time

from ldf.errors import ConfigError, NotFoundError, StorageError, UserInputError
from ldf.pipelines.apdb import (
    ApdbBuffer,
    ApdbUnavailableError,
    PromptApdb,
    default_buffer,
)
from ldf.pipelines.association import AssociationResult, associate, prepare_forced
from tests.pipelines.test_association import dia_frame, visit_info

RA0, DEC0 = 150.0, -30.0


def _sky(n: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``n`` positions ≥ 8″ apart within 0.05° of the field centre."""
    side = math.ceil(math.sqrt(n))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    ra = RA0 + (gx.ravel()[:n] - side / 2) * 8 / 3600 / math.cos(math.radians(DEC0))
    dec = DEC0 + (gy.ravel()[:n] - side / 2) * 8 / 3600
    return ra, dec


def _visit(
    db: PromptApdb, seq: int, mjd: float, ra: np.ndarray, dec: np.ndarray
) -> tuple[Time, AssociationResult, pd.DataFrame]:
    """Associate one visit of sources against the APDB; return what store() takes."""
    info = visit_info(seq, mjd=mjd)
    t = Time(info.mjd_mid_tai, format="mjd", scale="tai")
    hist = db.load_history(RA0, DEC0, 0.1, t)
    res = associate(
        dia_frame(ra, dec, np.full(len(ra), 900.0 + seq)),
        hist.objects,
        info=info,
        history=hist.sources,
    )
    forced = prepare_forced(
        hist.objects[["diaObjectId", "ra", "dec"]].assign(psfFlux=5.0, psfFluxErr=2.0),
        info=info,
    )
    return t, res, forced


def _sqlite(tmp_path: Path) -> PromptApdb:
    return PromptApdb.create(
        f"sqlite:///{tmp_path}/db/apdb.sqlite3", config_path=tmp_path / "apdb-config.yaml"
    )


def test_create_is_idempotent_and_writes_a_dax_apdb_config(tmp_path: Path) -> None:
    from lsst.dax.apdb import ApdbConfig, ApdbSqlConfig

    db = _sqlite(tmp_path)
    assert db.counts() == {"DiaObject": 0, "DiaSource": 0, "DiaForcedSource": 0, "buffered": 0}
    t, res, forced = _visit(db, 1, 61000.0, *_sky(10))
    assert db.store_or_buffer(t, res.objects, res.sources, forced) == "stored"
    # Creating again reuses the schema and keeps the data.
    again = _sqlite(tmp_path)
    assert again.counts()["DiaSource"] == 10
    config = ApdbConfig.from_uri(str(tmp_path / "apdb-config.yaml"))
    assert isinstance(config, ApdbSqlConfig)
    assert config.connection_config.connection_pool is False
    assert "mode=rw" in config.db_url
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apdb-config.yaml", "db"]
    raw = yaml.safe_load((tmp_path / "apdb-config.yaml").read_text())
    assert raw["implementation_type"] == "sql"


def test_store_and_history_window(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    ra, dec = _sky(30)
    # Visits 400, 300, 200 and 10 days before the last one, then the last one.
    mjds = [61000.0, 61100.0, 61200.0, 61390.0, 61400.0]
    for seq, mjd in enumerate(mjds, start=1):
        t, res, forced = _visit(db, seq, mjd, ra, dec)
        assert res.n_new == (30 if seq == 1 else 0)
        db.store(t, res.objects, res.sources, forced)
    counts = db.counts()
    assert counts["DiaSource"] == 150
    assert counts["DiaObject"] == 150  # every visit writes a new version of each object
    assert counts["DiaForcedSource"] == 120  # forced photometry of the 30 objects, visits 2–5
    t_last = Time(visit_info(6, mjd=61400.0).mjd_mid_tai, format="mjd", scale="tai")
    hist = db.load_history(RA0, DEC0, 0.1, t_last)
    assert len(hist.objects) == 30  # latest versions only
    assert (hist.objects["nDiaSources"] == 5).all()
    # 365 days before the visit: not the first visit, and not the visit itself (same time).
    start = t_last.tai.mjd - 365
    assert (hist.sources["midpointMjdTai"] >= start).all()
    assert (hist.sources["midpointMjdTai"] < t_last.tai.mjd).all()
    assert len(hist.sources) == 30 * 3  # days −300, −200, −10; the visit at −400 is out
    assert len(hist.forced) == 30 * 3
    # A narrower circle cuts exactly (dax_apdb's HTM envelope is a superset).
    small = db.load_history(RA0, DEC0, 10 / 3600, t_last)
    sep = np.hypot(
        (small.objects["ra"] - RA0) * math.cos(math.radians(DEC0)), small.objects["dec"] - DEC0
    )
    assert 0 < len(small.objects) < 30
    assert (sep <= 10 / 3600 + 1e-12).all()


def test_store_refuses_rows_it_could_not_store(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    t, res, forced = _visit(db, 1, 61000.0, *_sky(4))
    with pytest.raises(UserInputError, match="DiaSource rows not storable: midpointMjdTai"):
        db.store(t, res.objects, res.sources.drop(columns=["midpointMjdTai"]), forced)
    bad = res.objects.copy()
    bad.loc[0, "ra"] = np.nan
    with pytest.raises(UserInputError, match="ra has nulls"):
        db.store_or_buffer(t, bad, res.sources, forced)
    assert db.counts()["DiaSource"] == 0
    assert db.counts()["buffered"] == 0  # not storable is not buffered either


def test_unavailable_sqlite_buffers_then_flushes_in_order(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    ra, dec = _sky(20)
    t1, r1, f1 = _visit(db, 1, 61000.0, ra, dec)
    assert db.store_or_buffer(t1, r1.objects, r1.sources, f1) == "stored"
    t2, r2, f2 = _visit(db, 2, 61001.0, ra, dec)
    t3, r3, f3 = _visit(db, 3, 61002.0, ra[:10], dec[:10])
    # The APDB's directory goes away (a lost mount).
    (tmp_path / "db").rename(tmp_path / "db-away")
    with pytest.raises(ApdbUnavailableError) as err:
        db.counts()
    assert "\n" not in str(err.value)
    assert "unable to open database file" in str(err.value)
    assert db.store_or_buffer(t2, r2.objects, r2.sources, f2) == "buffered"
    assert db.store_or_buffer(t3, r3.objects, r3.sources, f3) == "buffered"
    assert db.buffer is not None
    assert db.buffer.keys() == [(r2.sources["visit"][0], 94), (r3.sources["visit"][0], 94)]
    # A worker restarting meanwhile finds the queue where it was.
    reopened = PromptApdb.open(tmp_path / "apdb-config.yaml")
    assert reopened.buffer is not None
    assert reopened.buffer.path == default_buffer(tmp_path / "apdb-config.yaml").path
    assert len(reopened.buffer) == 2
    (tmp_path / "db-away").rename(tmp_path / "db")
    report = reopened.flush()
    assert (report.stored, report.skipped, report.remaining) == (2, 0, 0)
    counts = reopened.counts()
    assert counts["DiaSource"] == 20 + 20 + 10
    assert counts["buffered"] == 0
    t4 = Time(61003.0, format="mjd", scale="tai")
    hist = reopened.load_history(RA0, DEC0, 0.1, t4)
    # Replayed in order: the latest version of an object seen in visit 3 is visit 3's.
    latest = hist.objects.set_index("diaObjectId")["validityStartMjdTai"]
    in_visit3 = r3.objects["diaObjectId"].to_numpy()
    assert (latest.loc[in_visit3] == t3.tai.mjd).all()
    assert (latest.drop(index=in_visit3) == t2.tai.mjd).all()
    assert reopened.flush().stored == 0


def test_flush_skips_a_batch_already_stored(tmp_path: Path) -> None:
    """A crash between storing a batch and dropping it from the queue stores nothing twice."""
    db = _sqlite(tmp_path)
    t, res, forced = _visit(db, 1, 61000.0, *_sky(12))
    assert db.store_or_buffer(t, res.objects, res.sources, forced) == "stored"
    assert db.buffer is not None
    db.buffer.append(1, 94, t, res.objects, res.sources, forced, reason="crash before dequeue")
    report = db.flush()
    assert (report.stored, report.skipped, report.remaining) == (0, 1, 0)
    assert db.counts()["DiaSource"] == 12
    # Re-running the same detector-visit is recognised too.
    assert db.store_or_buffer(t, res.objects, res.sources, forced) == "already-stored"
    assert db.counts()["DiaSource"] == 12


def test_partial_overlap_is_refused_not_guessed(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    t, res, forced = _visit(db, 1, 61000.0, *_sky(6))
    db.store(t, res.objects.iloc[:3], res.sources.iloc[:3], None)
    assert db.buffer is not None
    db.buffer.append(1, 94, t, res.objects, res.sources, forced, reason="test")
    with pytest.raises(StorageError, match="3 of 6 DiaSources"):
        db.flush()
    assert len(db.buffer) == 1


def test_buffer_round_trips_tables(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    t, res, forced = _visit(db, 1, 61000.0, *_sky(5))
    buf = ApdbBuffer(tmp_path / "q" / "buffer.sqlite3")
    assert len(buf) == 0
    assert not buf.path.exists()
    buf.append(1, 94, t, res.objects, res.sources, forced, reason="why")
    buf.append(1, 94, t, res.objects, res.sources, forced, reason="again")  # replaces
    (batch,) = list(ApdbBuffer(buf.path).batches())
    assert batch.reason == "again"
    assert batch.visit_time.tai.mjd == pytest.approx(t.tai.mjd, abs=1e-9)
    pd.testing.assert_frame_equal(batch.objects, res.objects)
    assert batch.sources is not None
    assert batch.sources["diaSourceId"].tolist() == res.sources["diaSourceId"].tolist()
    assert batch.sources["pixelFlags_bad"].tolist() == res.sources["pixelFlags_bad"].tolist()


def test_unreachable_postgres_is_unavailable_and_buffered(tmp_path: Path) -> None:
    url = "postgresql+psycopg://ldf:s3cret@127.0.0.1:1/apdb"
    with pytest.raises(ApdbUnavailableError) as err:
        PromptApdb.create(url, config_path=tmp_path / "x.yaml", connection_timeout_s=2)
    assert "s3cret" not in str(err.value)
    assert "Connection refused" in str(err.value) or "connection failed" in str(err.value)
    # A configured APDB whose server is down: open works (no connection), stores buffer.
    sqlite_db = _sqlite(tmp_path / "ok")
    t, res, forced = _visit(sqlite_db, 1, 61000.0, *_sky(3))
    (tmp_path / "down.yaml").write_text(
        yaml.safe_dump({"implementation_type": "sql", "db_url": url})
    )
    down = PromptApdb.open(tmp_path / "down.yaml")
    assert down.store_or_buffer(t, res.objects, res.sources, forced) == "buffered"
    assert down.buffer is not None
    assert len(down.buffer) == 1
    assert "s3cret" not in down.url


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        PromptApdb.open(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("just: text\n")
    with pytest.raises(ConfigError, match="not a dax_apdb configuration"):
        PromptApdb.open(tmp_path / "bad.yaml")
    with pytest.raises(UserInputError, match="SQLite or PostgreSQL"):
        PromptApdb.create("mysql://x@y/z", config_path=tmp_path / "c.yaml")
    with pytest.raises(UserInputError, match="file path"):
        PromptApdb.create("sqlite://", config_path=tmp_path / "c.yaml")


@pytest.mark.postgres
def test_postgres_store_history_and_buffer(postgres_url: str, tmp_path: Path) -> None:
    config = tmp_path / "apdb-config.yaml"
    db = PromptApdb.create(postgres_url, config_path=config)
    db = PromptApdb.create(postgres_url, config_path=config)  # idempotent
    ra, dec = _sky(25)
    t1, r1, f1 = _visit(db, 1, 61000.0, ra, dec)
    assert db.store_or_buffer(t1, r1.objects, r1.sources, f1) == "stored"
    t2, r2, f2 = _visit(db, 2, 61001.0, ra, dec)
    assert r2.n_matched == 25
    # The server "goes away": the same configuration pointing at a closed port.
    down_cfg = yaml.safe_load(config.read_text())
    down_cfg["db_url"] = "postgresql+psycopg://postgres@127.0.0.1:1/apdb"
    (tmp_path / "down.yaml").write_text(yaml.safe_dump(down_cfg))
    down = PromptApdb.open(tmp_path / "down.yaml", buffer=default_buffer(config))
    assert down.store_or_buffer(t2, r2.objects, r2.sources, f2) == "buffered"
    # Back: the buffered visit goes in first, the next visit after it.
    up = PromptApdb.open(config)
    t3, r3, f3 = _visit(up, 3, 61002.0, ra, dec)
    assert r3.n_matched == 25
    assert up.store_or_buffer(t3, r3.objects, r3.sources, f3) == "stored"
    assert up.counts() == {
        "DiaObject": 75,
        "DiaSource": 75,
        "DiaForcedSource": 50,
        "buffered": 0,
    }
    hist = up.load_history(RA0, DEC0, 0.1, Time(61003.0, format="mjd", scale="tai"))
    assert len(hist.objects) == 25
    # Visit 3 associated before visit 2 was replayed: its objects count 2, and being stored
    # last, they are the latest versions.
    assert (hist.objects["nDiaSources"] == 2).all()
    assert len(hist.sources) == 75
    assert hist.objects["validityEndMjdTai"].isna().all()
    assert up.store_or_buffer(t3, r3.objects, r3.sources, f3) == "already-stored"
    up.close()
