"""Association: identifiers, one-to-one sky matching, DiaObject updates against known truth."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ldf.pipelines.apdb import apdb_columns
from ldf.pipelines.association import (
    associate,
    dia_forced_source_id,
    dia_forced_source_ids,
    dia_source_id,
    dia_source_ids,
    match_one_to_one,
    prepare_forced,
)
from ldf.pipelines.types import DetectorError, VisitInfo

DAY_OBS = 20261121


def visit_info(
    seq: int = 1, *, mjd: float = 61000.1, band: str | None = "r", det: int = 94
) -> VisitInfo:
    return VisitInfo(
        instrument="LSSTCam",
        exposure_id=DAY_OBS * 100000 + seq,
        day_obs=DAY_OBS,
        seq_num=seq,
        detector="R22_S11",
        detector_id=det,
        obs_type="science",
        band=band,
        physical_filter=f"{band}_57" if band else None,
        exp_time_s=30.0,
        dark_time_s=31.0,
        mjd_begin_tai=mjd,
        ra_deg=150.0,
        dec_deg=-30.0,
        rot_sky_deg=0.0,
        airmass=1.1,
    )


def dia_frame(ra, dec, flux, err=50.0, sflux=None, serr=60.0) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """A DiaSource table as the DIA stage makes it (no ids, no times)."""
    n = len(ra)
    return pd.DataFrame(
        {
            "x": np.linspace(10, 900, n),
            "y": np.linspace(20, 800, n),
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
            "psfFlux": np.asarray(flux, float),
            "psfFluxErr": np.broadcast_to(np.asarray(err, float), (n,)).copy(),
            "scienceFlux": np.asarray(flux if sflux is None else sflux, float) + 5000.0,
            "scienceFluxErr": np.full(n, serr),
            "snr": np.asarray(flux, float) / 50.0,
            "isDipole": np.zeros(n, bool),
            "isNegative": np.asarray(flux, float) < 0,
            "pixelFlags_bad": np.zeros(n, bool),
            "bboxSize": np.full(n, 21, np.int64),
            "band": ["r"] * n,
        }
    )


# -- identifiers -------------------------------------------------------------------------------


def test_dia_source_id_packs_exposure_detector_index() -> None:
    exposure = DAY_OBS * 100000 + 42
    sid = dia_source_id(exposure, 94, 7)
    assert sid == (exposure * 256 + 94) * 4096 + 7
    assert sid >> 20 == exposure
    assert (sid >> 12) & 0xFF == 94
    assert sid & 0xFFF == 7
    ids = dia_source_ids(exposure, 94, 4096)
    assert ids.dtype == np.int64
    assert ids[7] == sid
    assert ids[-1] == dia_source_id(exposure, 94, 4095)
    assert len(np.unique(ids)) == 4096


def test_dia_forced_source_id_has_more_index_bits() -> None:
    exposure = DAY_OBS * 100000 + 42
    fid = dia_forced_source_id(exposure, 94, 10000)
    assert fid == (exposure * 256 + 94) * 16384 + 10000
    assert dia_forced_source_ids(exposure, 94, 16384)[10000] == fid


@pytest.mark.parametrize(
    ("exposure", "detector", "index", "match"),
    [
        (DAY_OBS * 100000 + 1, 256, 0, "detector id 256"),
        (DAY_OBS * 100000 + 1, -1, 0, "detector id -1"),
        (DAY_OBS * 100000 + 1, 3, 4096, "4097 DiaSources"),
        (DAY_OBS * 100000 + 1, 3, -2, "negative"),
        (-5, 3, 0, "negative exposure"),
        (2**45, 3, 0, "too large for a 64-bit"),
    ],
)
def test_dia_source_id_bounds(exposure: int, detector: int, index: int, match: str) -> None:
    with pytest.raises(DetectorError, match=match) as info:
        dia_source_id(exposure, detector, index)
    assert info.value.stage == "association"


def test_too_many_sources_for_ids_is_a_detector_error() -> None:
    with pytest.raises(DetectorError, match="5000 DiaSources"):
        dia_source_ids(DAY_OBS * 100000 + 1, 3, 5000)
    with pytest.raises(DetectorError, match="16385 DiaForcedSources"):
        dia_forced_source_ids(DAY_OBS * 100000 + 1, 3, 16385)


# -- matching ----------------------------------------------------------------------------------


def _brute_greedy(ra1, dec1, ra2, dec2, radius):  # type: ignore[no-untyped-def]
    """Reference: all pairs by true angular distance, accepted closest first."""
    from astropy.coordinates import angular_separation

    r1, d1 = np.radians(ra1)[:, None], np.radians(dec1)[:, None]
    r2, d2 = np.radians(ra2)[None, :], np.radians(dec2)[None, :]
    sep = np.degrees(angular_separation(r1, d1, r2, d2)) * 3600
    pairs = sorted((sep[i, j], i, j) for i, j in zip(*np.nonzero(sep <= radius), strict=True))
    used_i, used_j, out = set(), set(), {}
    for _, i, j in pairs:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            out[int(i)] = int(j)
    return out


@pytest.mark.parametrize(("ra0", "dec0"), [(150.0, -30.0), (0.0, 10.0), (45.0, 89.99)])
def test_match_one_to_one_equals_brute_force_greedy(ra0: float, dec0: float) -> None:
    rng = np.random.default_rng(3)
    n = 400
    # A dense field (objects 1–3″ apart) so that many sources have several candidates.
    ra2 = ra0 + rng.uniform(-10, 10, n) / 3600 / max(math.cos(math.radians(dec0)), 1e-3)
    dec2 = np.clip(dec0 + rng.uniform(-10, 10, n) / 3600, -90, 90)
    pick = rng.choice(n, 300, replace=False)
    ra1 = (ra2[pick] + rng.normal(0, 0.6, 300) / 3600) % 360
    dec1 = np.clip(dec2[pick] + rng.normal(0, 0.6, 300) / 3600, -90, 90)
    i1, i2, sep = match_one_to_one(ra1, dec1, ra2 % 360, dec2, 1.5)
    assert len(set(i1.tolist())) == len(i1)
    assert len(set(i2.tolist())) == len(i2)
    assert np.all(sep <= 1.5 + 1e-9)
    assert np.all(np.diff(sep) >= 0)
    got = dict(zip(i1.tolist(), i2.tolist(), strict=True))
    assert got == _brute_greedy(ra1, dec1, ra2 % 360, dec2, 1.5)
    assert len(got) > 200


def test_match_across_ra_zero() -> None:
    i1, i2, sep = match_one_to_one(
        np.array([359.99999]), np.array([0.0]), np.array([0.00001]), np.array([0.0]), 1.0
    )
    assert i1.tolist() == [0]
    assert i2.tolist() == [0]
    assert sep[0] == pytest.approx(0.072, abs=1e-3)


# -- associate ---------------------------------------------------------------------------------


def _field(n: int = 60, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # A grid 10″ apart: unambiguous truth for a 1″ radius.
    side = math.ceil(math.sqrt(n))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    ra = 150.0 + gx.ravel()[:n] * 10 / 3600 / math.cos(math.radians(-30))
    dec = -30.0 + gy.ravel()[:n] * 10 / 3600
    return ra + rng.normal(0, 1e-6, n), dec


def test_first_visit_founds_one_object_per_source() -> None:
    ra, dec = _field()
    info = visit_info(1)
    res = associate(dia_frame(ra, dec, np.full(len(ra), 1000.0)), None, info=info)
    assert res.n_new == len(ra)
    assert res.n_matched == 0
    src, obj = res.sources, res.objects
    np.testing.assert_array_equal(src["diaSourceId"], dia_source_ids(info.exposure_id, 94, 60))
    np.testing.assert_array_equal(src["diaObjectId"], src["diaSourceId"])
    np.testing.assert_array_equal(obj["diaObjectId"], src["diaSourceId"])
    assert (src["visit"] == info.exposure_id).all()
    assert (src["detector"] == 94).all()
    assert (src["midpointMjdTai"] == info.mjd_mid_tai).all()
    assert (src["band"] == "r").all()
    assert (src["exposureTime"] == 30.0).all()
    # Every non-nullable APDB column is there and filled, in both tables.
    for table, frame in (("DiaSource", src), ("DiaObject", obj)):
        for col in apdb_columns(table):
            if not col.nullable:
                assert col.name in frame.columns, (table, col.name)
                assert not frame[col.name].isna().any(), (table, col.name)
    assert list(obj.columns) == [c.name for c in apdb_columns("DiaObject")]
    assert (obj["nDiaSources"] == 1).all()
    assert (obj["r_psfFluxNdata"] == 1).all()
    assert (obj["g_psfFluxNdata"] == 0).all()
    np.testing.assert_allclose(obj["r_psfFluxMean"], 1000.0)
    np.testing.assert_allclose(obj["r_psfFluxMeanErr"], 50.0)
    assert obj["r_psfFluxSigma"].isna().all()
    np.testing.assert_allclose(obj["r_scienceFluxMean"], 6000.0)
    np.testing.assert_allclose(obj["ra"], ra)
    assert (obj["firstDiaSourceMjdTai"] == info.mjd_mid_tai).all()
    assert (obj["validityStartMjdTai"] == info.mjd_mid_tai).all()


def test_second_visit_updates_matched_objects() -> None:
    ra, dec = _field()
    n = len(ra)
    rng = np.random.default_rng(5)
    f1 = rng.normal(1000, 40, n)
    f2 = rng.normal(1400, 40, n)
    e1 = np.full(n, 40.0)
    e2 = np.full(n, 80.0)
    first = associate(dia_frame(ra, dec, f1, e1), None, info=visit_info(1))
    # Second visit: every source 0.3″ off in dec, in a shuffled order; plus 5 new sources 5″
    # away from any object (which must not match).
    order = rng.permutation(n)
    dra = np.concatenate([ra[order], ra[:5] + 5 / 3600])
    ddec = np.concatenate([dec[order] + 0.3 / 3600, dec[:5]])
    flux = np.concatenate([f2[order], np.full(5, 500.0)])
    errs = np.concatenate([e2[order], np.full(5, 80.0)])
    info2 = visit_info(2, mjd=61003.1)
    second = associate(dia_frame(dra, ddec, flux, errs), first.objects, info=info2)
    assert second.n_matched == n
    assert second.n_new == 5
    expect = first.objects["diaObjectId"].to_numpy()[order]
    np.testing.assert_array_equal(second.sources["diaObjectId"].to_numpy()[:n], expect)
    np.testing.assert_array_equal(
        second.sources["diaObjectId"].to_numpy()[n:], second.sources["diaSourceId"].to_numpy()[n:]
    )
    # Row k of the objects is the DiaObject of DiaSource k.
    np.testing.assert_array_equal(second.objects["diaObjectId"], second.sources["diaObjectId"])
    upd = second.objects.set_index("diaObjectId").loc[expect]
    # Position: the mean of the two detections (each counts once without position errors).
    np.testing.assert_allclose(upd["dec"], dec[order] + 0.15 / 3600, atol=1e-9)
    np.testing.assert_allclose(upd["ra"], ra[order], atol=1e-9)
    assert (upd["nDiaSources"] == 2).all()
    assert (upd["r_psfFluxNdata"] == 2).all()
    w1, w2 = 1 / 40.0**2, 1 / 80.0**2
    mean = (f1[order] * w1 + f2[order] * w2) / (w1 + w2)
    np.testing.assert_allclose(upd["r_psfFluxMean"], mean, rtol=1e-12)
    np.testing.assert_allclose(upd["r_psfFluxMeanErr"], 1 / math.sqrt(w1 + w2))
    sigma = np.std(np.stack([f1[order], f2[order]]), axis=0, ddof=1)
    # Errors differ, so the summary update approximates the unweighted mean by the weighted.
    np.testing.assert_allclose(upd["r_psfFluxSigma"], sigma, rtol=0.05)
    np.testing.assert_allclose(upd["r_psfFluxMin"], np.minimum(f1[order], f2[order]))
    np.testing.assert_allclose(upd["r_psfFluxMax"], np.maximum(f1[order], f2[order]))
    np.testing.assert_allclose(upd["r_psfFluxErrMean"], 60.0)
    np.testing.assert_allclose(
        upd["r_scienceFluxMean"], (f1[order] + f2[order]) / 2 + 5000.0, rtol=1e-12
    )
    assert (upd["firstDiaSourceMjdTai"] == visit_info(1).mjd_mid_tai).all()
    assert (upd["lastDiaSourceMjdTai"] == info2.mjd_mid_tai).all()
    assert (upd["validityStartMjdTai"] == info2.mjd_mid_tai).all()
    assert (upd["g_psfFluxNdata"] == 0).all()


def test_history_recomputes_the_summary_exactly() -> None:
    """Three visits; with the DiaSource history the summary is the plain statistics."""
    ra, dec = _field(20)
    rng = np.random.default_rng(8)
    fluxes = rng.normal(1000, 100, (3, 20))
    errs = rng.uniform(30, 90, (3, 20))
    objects: pd.DataFrame | None = None
    history: list[pd.DataFrame] = []
    for k in range(3):
        res = associate(
            dia_frame(ra, dec, fluxes[k], errs[k]),
            objects,
            info=visit_info(k + 1, mjd=61000.1 + k),
            history=pd.concat(history, ignore_index=True) if history else None,
        )
        objects = res.objects
        history.append(res.sources)
    assert objects is not None
    w = 1 / errs**2
    np.testing.assert_allclose(objects["r_psfFluxMean"], (fluxes * w).sum(0) / w.sum(0))
    np.testing.assert_allclose(objects["r_psfFluxMeanErr"], 1 / np.sqrt(w.sum(0)))
    np.testing.assert_allclose(objects["r_psfFluxSigma"], fluxes.std(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(objects["r_psfFluxErrMean"], errs.mean(0))
    assert (objects["r_psfFluxNdata"] == 3).all()
    assert (objects["nDiaSources"] == 3).all()


def test_summary_update_is_exact_with_equal_errors() -> None:
    ra, dec = _field(20)
    rng = np.random.default_rng(9)
    fluxes = rng.normal(1000, 100, (4, 20))
    objects = None
    for k in range(4):
        objects = associate(
            dia_frame(ra, dec, fluxes[k], 50.0), objects, info=visit_info(k + 1)
        ).objects
    assert objects is not None
    np.testing.assert_allclose(objects["r_psfFluxMean"], fluxes.mean(0), rtol=1e-12)
    np.testing.assert_allclose(objects["r_psfFluxSigma"], fluxes.std(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(objects["r_psfFluxMeanErr"], 50.0 / 2)


def test_one_to_one_closest_wins() -> None:
    obj = associate(dia_frame([150.0], [-30.0], [1000.0]), None, info=visit_info(1)).objects
    # Two sources 0.2″ and 0.6″ from the one object: the closer takes it.
    srcs = dia_frame([150.0, 150.0], [-30.0 + 0.6 / 3600, -30.0 - 0.2 / 3600], [900.0, 1100.0])
    res = associate(srcs, obj, info=visit_info(2))
    assert res.n_matched == 1
    assert res.n_new == 1
    oid = int(obj["diaObjectId"].iloc[0])
    assert int(res.sources["diaObjectId"].iloc[1]) == oid
    assert int(res.sources["diaObjectId"].iloc[0]) == int(res.sources["diaSourceId"].iloc[0])


def test_other_band_keeps_its_summary() -> None:
    ra, dec = _field(5)
    first = associate(dia_frame(ra, dec, np.full(5, 1000.0)), None, info=visit_info(1))
    second = associate(
        dia_frame(ra, dec, np.full(5, 3000.0)), first.objects, info=visit_info(2, band="g")
    )
    assert (second.sources["band"] == "g").all()
    obj = second.objects
    np.testing.assert_allclose(obj["r_psfFluxMean"], 1000.0)
    assert (obj["r_psfFluxNdata"] == 1).all()
    np.testing.assert_allclose(obj["g_psfFluxMean"], 3000.0)
    assert (obj["g_psfFluxNdata"] == 1).all()
    assert (obj["nDiaSources"] == 2).all()


def test_position_is_inverse_variance_weighted_when_errors_are_known() -> None:
    first = dia_frame([150.0], [-30.0], [1000.0])
    first["raErr"] = first["decErr"] = 0.1 / 3600
    obj = associate(first, None, info=visit_info(1)).objects
    second = dia_frame([150.0], [-30.0 + 0.5 / 3600], [1000.0])
    second["raErr"] = second["decErr"] = 0.2 / 3600
    upd = associate(second, obj, info=visit_info(2)).objects
    # Weights 1/0.1² and 1/0.2²: the mean lies 1/5 of the way to the second detection.
    assert (upd["dec"].iloc[0] + 30.0) * 3600 == pytest.approx(0.1, abs=1e-6)
    assert upd["raErr"].iloc[0] * 3600 == pytest.approx(1 / math.sqrt(100 + 25), rel=1e-6)


def test_empty_visit() -> None:
    res = associate(dia_frame([], [], []), None, info=visit_info(1))
    assert res.n_new == 0
    assert res.n_matched == 0
    assert len(res.sources) == 0
    assert len(res.objects) == 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("no-band", "has no band"),
        ("nan-ra", "without a valid ra/dec"),
        ("no-x", "lacks column"),
        ("odd-band", "no DiaObject columns"),
        ("radius", "radius must be > 0"),
        ("objects", "DiaObject table lacks column"),
    ],
)
def test_bad_input_is_a_detector_error(change: str, match: str) -> None:
    frame = dia_frame([150.0, 150.001], [-30.0, -30.0], [1.0, 2.0])
    info = visit_info(1)
    radius = 1.0
    if change == "no-band":
        info = visit_info(1, band=None)
    elif change == "nan-ra":
        frame.loc[1, "ra"] = np.nan
    elif change == "no-x":
        frame = frame.drop(columns=["x"])
    elif change == "odd-band":
        info = visit_info(1, band="N921")
    elif change == "radius":
        radius = 0.0
    objects = pd.DataFrame({"ra": [150.0], "dec": [-30.0]}) if change == "objects" else None
    with pytest.raises(DetectorError, match=match) as err:
        associate(frame, objects, info=info, radius_arcsec=radius)
    assert err.value.stage == "association"


def test_prepare_forced() -> None:
    info = visit_info(3, mjd=61010.0)
    forced = pd.DataFrame(
        {
            "diaObjectId": np.array([2**62 + 5, 17], np.int64),
            "ra": [150.0, 150.1],
            "dec": [-30.0, -30.1],
            "psfFlux": [12.0, np.nan],
            "psfFluxErr": [3.0, 3.0],
        }
    )
    out = prepare_forced(forced, info=info, processed_mjd_tai=61010.5)
    np.testing.assert_array_equal(
        out["diaForcedSourceId"], dia_forced_source_ids(info.exposure_id, 94, 2)
    )
    assert out["diaObjectId"].tolist() == [2**62 + 5, 17]
    assert (out["visit"] == info.exposure_id).all()
    assert (out["midpointMjdTai"] == info.mjd_mid_tai).all()
    assert (out["timeProcessedMjdTai"] == 61010.5).all()
    assert (out["band"] == "r").all()
    assert len(prepare_forced(None, info=info)) == 0
    with pytest.raises(DetectorError, match="diaObjectId"):
        prepare_forced(forced.drop(columns=["diaObjectId"]), info=info)
