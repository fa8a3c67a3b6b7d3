"""The HTM-sharded reference catalogue: ingest, load, errors, copies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from lsst.sphgeom import HtmPixelization, LonLat, UnitVector3d

from ldf.errors import UserInputError
from ldf.pipelines.refcat import (
    HTM_LEVEL,
    POSITION_ERROR_MAS,
    REFCAT_DTYPE,
    RefcatStore,
    angular_separation_deg,
)
from ldf.pipelines.types import DetectorError
from ldf.sim.sky import Sky
from tests.pipelines.conftest import SEED

RA, DEC, RADIUS = 150.0, -30.0, 0.2


@pytest.fixture(scope="module")
def sky() -> Sky:
    return Sky(SEED)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, sky: Sky) -> RefcatStore:
    st = RefcatStore(tmp_path_factory.mktemp("refcat"))
    st.ingest_region(sky, RA, DEC, RADIUS)
    return st


def test_ingest_writes_every_overlapping_shard(store: RefcatStore) -> None:
    shards = store.shards_for(RA, DEC, RADIUS)
    assert shards
    assert store.existing_shards() == sorted(shards)
    centre = HtmPixelization(HTM_LEVEL).index(UnitVector3d(LonLat.fromDegrees(RA, DEC)))
    assert centre in shards
    assert (store.root / "refcat.json").exists()
    # Nothing half-written is left behind.
    assert not [p for p in store.root.rglob("*") if p.name.startswith(".")]


def test_shards_hold_only_their_trixel(store: RefcatStore) -> None:
    pix = HtmPixelization(HTM_LEVEL)
    for shard in store.shards_for(RA, DEC, RADIUS):
        rows = store.load_shard(shard)
        assert rows.dtype == REFCAT_DTYPE
        assert np.all(np.diff(rows["source_id"]) > 0)
        tri = pix.triangle(shard)
        # The catalogue positions carry 10 mas errors: a star on an edge may step across.
        inside = np.asarray(tri.contains(np.radians(rows["ra"]), np.radians(rows["dec"])))
        assert inside.mean() > 0.999


def test_load_region_is_the_sky_to_the_limit(store: RefcatStore, sky: Sky) -> None:
    rows = store.load_region(RA, DEC, 0.1)
    truth = sky.stars(RA, DEC, 0.1)
    truth = truth[truth["r"] <= 21.0]
    assert len(rows) > 100
    assert len(np.unique(rows["source_id"])) == len(rows)
    assert angular_separation_deg(RA, DEC, rows["ra"], rows["dec"]).max() <= 0.1
    # Same stars, up to those within a few catalogue errors of the circle's edge.
    common = np.intersect1d(rows["source_id"], truth["source_id"])
    assert len(common) >= 0.99 * len(truth)
    assert len(common) >= 0.99 * len(rows)


def test_catalogue_errors_are_realistic_and_deterministic(
    store: RefcatStore, sky: Sky, tmp_path: Path
) -> None:
    rows = store.load_region(RA, DEC, 0.15)
    truth = sky.stars(RA, DEC, 0.16)
    order = np.searchsorted(
        truth["source_id"], rows["source_id"], sorter=np.argsort(truth["source_id"])
    )
    t = truth[np.argsort(truth["source_id"])][order]
    assert np.array_equal(t["source_id"], rows["source_id"])
    cos_dec = np.cos(np.radians(t["dec"]))
    d_east = (rows["ra"] - t["ra"]) * cos_dec * 3.6e6
    d_north = (rows["dec"] - t["dec"]) * 3.6e6
    for d in (d_east, d_north):
        assert abs(float(np.mean(d))) < 1.5
        assert float(np.std(d)) == pytest.approx(POSITION_ERROR_MAS, rel=0.15)
    assert np.all(rows["ra_err"] == POSITION_ERROR_MAS)
    for band in ("u", "g", "r", "i", "z", "y"):
        err = rows[f"{band}_err"]
        assert err.min() >= 0.005 - 1e-7
        assert err.max() <= 0.02 + 1e-7
        pull = (rows[band] - t[band]) / err
        assert float(np.std(pull)) == pytest.approx(1.0, rel=0.15)
    bright = rows["r"] < 17
    assert np.all(rows["r_err"][bright] < 0.006)
    # A second store ingesting another region has the same values for the same stars.
    other = RefcatStore(tmp_path / "other")
    other.ingest_region(sky, RA + 0.05, DEC, 0.06)
    again = other.load_region(RA + 0.05, DEC, 0.05)
    mine = rows[np.isin(rows["source_id"], again["source_id"])]
    again = again[np.isin(again["source_id"], mine["source_id"])]
    assert len(mine) > 10
    np.testing.assert_array_equal(
        np.sort(mine, order="source_id"), np.sort(again, order="source_id")
    )


def test_ingest_is_idempotent(sky: Sky, tmp_path: Path) -> None:
    st = RefcatStore(tmp_path / "cat")
    first = st.ingest_region(sky, 10.0, 5.0, 0.05)
    assert first
    stamps = {s: st.shard_path(s).stat().st_mtime_ns for s in first}
    assert st.ingest_region(sky, 10.0, 5.0, 0.05) == []
    assert {s: st.shard_path(s).stat().st_mtime_ns for s in first} == stamps
    # An overlapping region only adds the shards it newly needs.
    more = st.ingest_region(sky, 10.0, 5.0, 0.5)
    assert set(more).isdisjoint(first)
    assert set(st.existing_shards()) == set(st.shards_for(10.0, 5.0, 0.5))


def test_one_depth_per_catalogue(sky: Sky, tmp_path: Path) -> None:
    st = RefcatStore(tmp_path / "cat")
    st.ingest_region(sky, 10.0, 5.0, 0.01, mag_limit=20.0)
    assert json.loads((st.root / "refcat.json").read_text())["mag_limit"] == 20.0
    assert st.load_region(10.0, 5.0, 0.3)["r"].max() <= 20.0 + 0.1
    with pytest.raises(UserInputError, match="mix depths"):
        st.ingest_region(sky, 10.0, 5.0, 0.3, mag_limit=21.0)
    with pytest.raises(DetectorError, match="not HTM level 8"):
        RefcatStore(st.root, level=8)


def test_missing_shard_is_an_operator_error(sky: Sky, tmp_path: Path) -> None:
    st = RefcatStore(tmp_path / "cat")
    st.ingest_region(sky, 10.0, 5.0, 0.01)
    with pytest.raises(DetectorError) as info:
        st.load_region(40.0, -5.0, 0.01)
    assert info.value.stage == "astrometry"
    assert "ldf refcat ingest" in info.value.reason
    assert "shard" in info.value.reason
    # A corrupt shard says so.
    shard = st.existing_shards()[0]
    st.shard_path(shard).write_bytes(b"not a numpy file")
    with pytest.raises(DetectorError, match="unreadable"):
        st.load_region(10.0, 5.0, 0.01)


def test_region_across_ra_zero(sky: Sky, tmp_path: Path) -> None:
    st = RefcatStore(tmp_path / "cat")
    st.ingest_region(sky, 0.02, 10.0, 0.1)
    rows = st.load_region(0.02, 10.0, 0.1)
    assert np.any(rows["ra"] > 359.0)
    assert np.any(rows["ra"] < 1.0)
    truth = sky.stars(0.02, 10.0, 0.1)
    truth = truth[truth["r"] <= 21.0]
    assert len(np.intersect1d(rows["source_id"], truth["source_id"])) >= 0.99 * len(truth)


def test_copy_shards_for_worker_local_storage(store: RefcatStore, tmp_path: Path) -> None:
    shards = store.shards_for(RA, DEC, 0.05)
    local = store.copy_shards(shards, tmp_path / "local")
    assert isinstance(local, RefcatStore)
    assert local.existing_shards() == sorted(shards)
    np.testing.assert_array_equal(
        local.load_region(RA, DEC, 0.05), store.load_region(RA, DEC, 0.05)
    )
    # Copying again is a no-op; copying a shard that is not there is an error.
    assert store.copy_shards(shards, tmp_path / "local").existing_shards() == sorted(shards)
    with pytest.raises(DetectorError, match="ldf refcat ingest"):
        store.copy_shards([shards[0] + 10**6], tmp_path / "local")
    assert not [p for p in (tmp_path / "local").rglob("*") if p.name.startswith(".")]


def test_shards_for_is_conservative() -> None:
    st = RefcatStore("/nonexistent/never/created")
    pix = HtmPixelization(HTM_LEVEL)
    rng = np.random.default_rng(5)
    ra0, dec0, radius = 200.0, 45.0, 0.7
    shards = set(st.shards_for(ra0, dec0, radius))
    for _ in range(300):
        r = radius * math.sqrt(rng.random())
        phi = rng.uniform(0, 2 * math.pi)
        dec = dec0 + r * math.sin(phi)
        ra = ra0 + r * math.cos(phi) / math.cos(math.radians(dec0))
        if angular_separation_deg(ra0, dec0, np.array(ra), np.array(dec)) <= radius:
            assert pix.index(UnitVector3d(LonLat.fromDegrees(ra, dec))) in shards
