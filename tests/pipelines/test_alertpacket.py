"""Alert packets: schema 11.1 content, Confluent wire format, FITS cutouts, the local sink."""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.time import Time
from astropy.wcs import WCS

from ldf.errors import NotFoundError, StorageError, UserInputError
from ldf.pipelines.alertpacket import (
    AlertPacketError,
    AlertSchema,
    LocalAlertSink,
    build_alerts,
    deserialize,
    make_cutout,
    serialize,
)
from ldf.pipelines.apdb import ApdbHistory, PromptApdb
from ldf.pipelines.association import AssociationResult, associate, prepare_forced
from ldf.pipelines.types import DetectorError, Exposure, Mask
from ldf.sim.instruments import Instrument
from ldf.sim.sky import Sky
from tests.pipelines.conftest import SEED, expected_zero_point, make_visit, sim_exposure
from tests.pipelines.test_association import dia_frame, visit_info

# Earlier visits 500, 300 and 100 days before the alerting one.
HISTORY_DAYS = (-500.0, -300.0, -100.0)
T_NOW = 61400.0


@dataclass
class Scene:
    science: Exposure
    difference: Exposure
    result: AssociationResult
    history: ApdbHistory
    xy: np.ndarray


@pytest.fixture(scope="module")
def scene(small_camera: Instrument, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    """A simulated science image, a difference image with point sources at the DiaSources,
    and an APDB with three earlier visits of the same DiaObjects."""
    detector = small_camera.detector("R22_S11")
    visit = make_visit()
    science, _ = sim_exposure(small_camera, detector, visit, Sky(SEED))
    science.zero_point = expected_zero_point(small_camera, detector, visit)
    ny, nx = science.shape
    rng = np.random.default_rng(4)
    xy = np.column_stack([rng.uniform(40, nx - 40, 11), rng.uniform(40, ny - 40, 11)])
    xy = np.vstack([xy, [2.3, 3.6]])  # one at the corner: a padded cutout
    assert science.wcs is not None
    ra, dec = science.wcs.wcs_pix2world(xy[:, 0], xy[:, 1], 0)
    diff = science.copy()
    diff.image[:] = 0.0
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y in xy:  # a 1.5-pixel Gaussian at each DiaSource
        sl = (slice(max(int(y) - 8, 0), int(y) + 9), slice(max(int(x) - 8, 0), int(x) + 9))
        diff.image[sl] += 5000 * np.exp(-((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / (2 * 1.5**2))
    db = PromptApdb.create(
        f"sqlite:///{tmp_path_factory.mktemp('apdb')}/apdb.sqlite3",
        config_path=tmp_path_factory.mktemp("cfg") / "apdb-config.yaml",
    )
    ra0, dec0 = science.wcs.wcs_pix2world((nx - 1) / 2, (ny - 1) / 2, 0)
    result = None
    for k, dt in enumerate((*HISTORY_DAYS, 0.0)):
        info = visit_info(k + 1, mjd=T_NOW + dt)
        t = Time(info.mjd_mid_tai, format="mjd", scale="tai")
        hist = db.load_history(float(ra0), float(dec0), 0.1, t, history_days=1000.0)
        frame = dia_frame(ra, dec, np.full(len(ra), 1000.0 + k))
        frame["x"], frame["y"] = xy[:, 0], xy[:, 1]
        frame["apFlux"] = np.nan  # a nullable field without a value
        result = associate(frame, hist.objects, info=info, history=hist.sources)
        forced = prepare_forced(
            hist.objects[["diaObjectId", "ra", "dec"]].assign(psfFlux=3.0, psfFluxErr=1.0),
            info=info,
        )
        db.store(t, result.objects, result.sources, forced)
    assert result is not None
    return Scene(science, diff, result, hist, xy)


@pytest.fixture(scope="module")
def alerts(scene: Scene) -> list[dict]:
    return build_alerts(
        scene.result.sources,
        scene.result.objects,
        scene.history.sources,
        scene.history.forced,
        science=scene.science,
        template=None,
        difference=scene.difference,
    )


def test_latest_schema_and_its_registry_id() -> None:
    from lsst.alert.packet import Schema, get_latest_schema_version

    schema = AlertSchema.latest()
    major, minor = get_latest_schema_version()
    assert schema.version == f"{major}.{minor}" == "11.1"
    assert schema.schema_id == major * 100 + minor == 1101
    assert Schema.from_file().get_schema_id() == schema.schema_id
    assert AlertSchema.latest() is schema  # cached
    with pytest.raises(AlertPacketError, match=r"no alert schema 99\.9"):
        AlertSchema.for_version(99, 9)


def test_one_valid_alert_per_dia_source(scene: Scene, alerts: list[dict]) -> None:
    schema = AlertSchema.latest()
    sources = scene.result.sources
    assert len(alerts) == len(sources) == 12
    assert [a["diaSourceId"] for a in alerts] == sources["diaSourceId"].tolist()
    field_names = [f.name for f in schema.field_types("alert")]
    for alert in alerts:
        assert list(alert) == field_names
        schema.validate(alert)  # strict: every field present, every value of its type
        assert alert["ssSource"] is None
        assert alert["mpc_orbits"] is None
        assert alert["cutoutTemplate"] is None
        assert alert["observation_reason"] == "test"
        assert alert["target_name"] == scene.science.metadata["OBJECT"]
        src = alert["diaSource"]
        assert src["diaSourceId"] == alert["diaSourceId"]
        assert isinstance(src["diaSourceId"], int)
        assert src["diaSourceId"] > 2**53  # would not survive a float
        assert src["apFlux"] is None
        assert src["ssObjectId"] is None
        assert src["band"] == "r"
        assert src["isDipole"] is False
        obj = alert["diaObject"]
        assert obj["diaObjectId"] == src["diaObjectId"]
        assert obj["nDiaSources"] == 4
        assert obj["r_psfFluxNdata"] == 4  # the scene associates with 1000 days of history


def test_wire_format_round_trip(alerts: list[dict]) -> None:
    schema = AlertSchema.latest()
    for alert in alerts:
        packet = serialize(alert)
        assert packet[0] == 0
        assert packet[1:5] == (1101).to_bytes(4, "big")
        assert struct.unpack(">bI", packet[:5]) == (0, 1101)
        back = deserialize(packet)
        assert back["diaSourceId"] == alert["diaSourceId"]
        assert back["diaSource"]["diaObjectId"] == alert["diaSource"]["diaObjectId"]
        assert back["diaSource"]["visit"] == alert["diaSource"]["visit"]
        assert back["diaSource"]["ra"] == alert["diaSource"]["ra"]  # double
        assert back["diaSource"]["psfFlux"] == pytest.approx(alert["diaSource"]["psfFlux"])
        assert back["cutoutDifference"] == alert["cutoutDifference"]
        assert [s["diaSourceId"] for s in back["prvDiaSources"] or []] == [
            s["diaSourceId"] for s in alert["prvDiaSources"] or []
        ]
        schema.validate(back)


def test_history_is_twelve_months_oldest_first(scene: Scene, alerts: list[dict]) -> None:
    # The history handed in reaches 500 days back; alerts carry 365 days.
    assert scene.history.sources["midpointMjdTai"].min() < T_NOW - 365
    for alert in alerts:
        t = alert["diaSource"]["midpointMjdTai"]
        prv = alert["prvDiaSources"]
        assert prv is not None
        times = [s["midpointMjdTai"] for s in prv]
        assert times == sorted(times)
        assert len(prv) == 2
        assert all(t - 365 <= u < t for u in times)
        assert all(s["diaObjectId"] == alert["diaSource"]["diaObjectId"] for s in prv)
        forced = alert["prvDiaForcedSources"]
        assert [f["midpointMjdTai"] - T_NOW for f in forced] == pytest.approx(
            [-300.0, -100.0], abs=0.01
        )
        assert all(f["diaObjectId"] == alert["diaObject"]["diaObjectId"] for f in forced)


def test_first_detection_has_null_history(scene: Scene) -> None:
    info = visit_info(9, mjd=T_NOW)
    assert scene.science.wcs is not None
    ra, dec = scene.science.wcs.wcs_pix2world([500.0], [500.0], 0)
    res = associate(dia_frame(ra, dec, [100.0]), None, info=info)
    (alert,) = build_alerts(
        res.sources,
        res.objects,
        None,
        None,
        science=scene.science,
        template=scene.science,
        difference=scene.difference,
    )
    assert alert["prvDiaSources"] is None
    assert alert["prvDiaForcedSources"] is None
    assert alert["cutoutTemplate"] is not None
    AlertSchema.latest().validate(alert)


def test_cutouts_are_fits_with_a_wcs_on_the_source(scene: Scene, alerts: list[dict]) -> None:
    njy = scene.science.njy_per_electron()
    for alert, (x, y) in zip(alerts, scene.xy, strict=True):
        src = alert["diaSource"]
        for key, exposure in (
            ("cutoutDifference", scene.difference),
            ("cutoutScience", scene.science),
        ):
            with fits.open(io.BytesIO(alert[key])) as hdus:
                hdus.verify("exception")
                assert [h.name for h in hdus] == ["PRIMARY", "UNCERT", "MASK"]
                image = hdus[0].data
                header = hdus[0].header
                assert image.shape == (30, 30)
                assert header["BUNIT"] == "nJy"
                cx, cy = WCS(header).world_to_pixel_values(src["ra"], src["dec"])
                # The source sits in the middle pixel (15, 15) of the 30×30 cutout.
                assert abs(cx - 15) <= 0.5 + 1e-6
                assert abs(cy - 15) <= 0.5 + 1e-6
                assert cx == pytest.approx(x - header["CUTMINX"], abs=1e-6)
                assert cy == pytest.approx(y - header["CUTMINY"], abs=1e-6)
                x0, y0 = header["CUTMINX"], header["CUTMINY"]
                inside = (slice(max(-y0, 0), None), slice(max(-x0, 0), None))
                parent = (slice(max(y0, 0), y0 + 30), slice(max(x0, 0), x0 + 30))
                np.testing.assert_allclose(
                    image[inside], exposure.image[parent] * njy, rtol=1e-6, atol=1e-6
                )
                np.testing.assert_allclose(
                    hdus["UNCERT"].data[inside],
                    exposure.variance[parent] * njy**2,
                    rtol=1e-5,
                )
                assert hdus["MASK"].data.dtype == np.uint16
                if key == "cutoutDifference":
                    peak = np.unravel_index(np.argmax(image), image.shape)
                    assert abs(peak[0] - cy) <= 1
                    assert abs(peak[1] - cx) <= 1
        ccd = CCDData.read(io.BytesIO(alert["cutoutScience"]), format="fits")
        assert ccd.unit == "nJy"
        assert type(ccd.uncertainty).__name__ == "VarianceUncertainty"


def test_corner_cutout_is_zero_padded(scene: Scene, alerts: list[dict]) -> None:
    corner = alerts[-1]  # the DiaSource at (2.3, 3.6)
    with fits.open(io.BytesIO(corner["cutoutScience"])) as hdus:
        header = hdus[0].header
        assert (header["CUTMINX"], header["CUTMINY"]) == (2 - 15, 4 - 15)
        image, mask = hdus[0].data, hdus["MASK"].data
        assert (image[:11, :] == 0).all()
        assert (image[:, :13] == 0).all()
        assert (mask[:11, :] == Mask.NO_DATA).all()
        assert (mask[:, :13] == Mask.NO_DATA).all()
        assert not (mask[11:, 13:] & Mask.NO_DATA).any()
        assert image[11, 13] == pytest.approx(
            scene.science.image[0, 0] * scene.science.njy_per_electron(), rel=1e-6
        )


def test_make_cutout_direct() -> None:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.0, -5.0]
    wcs.wcs.crpix = [50.0, 40.0]
    wcs.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600
    image = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    mask = np.zeros(image.shape, np.uint16)
    mask[60, 70] = Mask.SAT | Mask.CR
    data = make_cutout(image, image * 2, mask, wcs, 70.4, 59.6, size=21, flux_scale=3.0)
    with fits.open(io.BytesIO(data)) as hdus:
        assert hdus[0].data.shape == (21, 21)
        assert hdus[0].data[10, 10] == image[60, 70] * 3
        assert hdus["UNCERT"].data[10, 10] == image[60, 70] * 2 * 9
        assert hdus["MASK"].data[10, 10] == Mask.SAT | Mask.CR
        assert hdus["MASK"].header["MP_CR"] == 2
        sky = wcs.pixel_to_world_values(70, 60)
        assert WCS(hdus[0].header).world_to_pixel_values(*sky) == pytest.approx((10, 10))
    with pytest.raises(DetectorError, match="planes differ"):
        make_cutout(image, image[:5], mask, wcs, 1, 1)
    with pytest.raises(DetectorError, match="not finite"):
        make_cutout(image, image, mask, wcs, math.nan, 1)


def test_required_field_missing_is_a_detector_error(scene: Scene) -> None:
    with pytest.raises(DetectorError, match="no column 'x'") as err:
        build_alerts(
            scene.result.sources.drop(columns=["x"]),
            scene.result.objects,
            None,
            None,
            science=scene.science,
            template=None,
            difference=scene.difference,
        )
    assert err.value.stage == "alerts"
    bad = scene.result.sources.copy()
    bad["midpointMjdTai"] = bad["midpointMjdTai"].astype(object)
    bad.loc[0, "midpointMjdTai"] = None
    with pytest.raises(DetectorError, match=r"diaSource\.midpointMjdTai is null"):
        build_alerts(
            bad,
            scene.result.objects,
            None,
            None,
            science=scene.science,
            template=None,
            difference=scene.difference,
        )


def test_no_zero_point_is_a_detector_error(scene: Scene) -> None:
    science = scene.science.copy(zero_point=None)
    with pytest.raises(DetectorError, match="no zero point"):
        build_alerts(
            scene.result.sources,
            scene.result.objects,
            None,
            None,
            science=science,
            template=None,
            difference=scene.difference.copy(zero_point=None),
        )


@pytest.mark.parametrize(
    ("packet", "match"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01" + (1101).to_bytes(4, "big") + b"\x00", "magic byte 1"),
        (b"\x00" + (1100).to_bytes(4, "big") + b"\x00", "schema id 1100"),
        (b"\x00" + (1101).to_bytes(4, "big") + b"\x02", "corrupt alert body"),
    ],
)
def test_deserialize_refuses_bad_packets(packet: bytes, match: str) -> None:
    with pytest.raises(AlertPacketError, match=match):
        deserialize(packet)


def test_deserialize_refuses_trailing_bytes(alerts: list[dict]) -> None:
    with pytest.raises(AlertPacketError, match="trailing"):
        deserialize(serialize(alerts[0]) + b"\x00")


def test_serialize_refuses_an_alert_off_schema(alerts: list[dict]) -> None:
    broken = dict(alerts[0])
    broken["diaSource"] = dict(broken["diaSource"], visit="not a number")
    with pytest.raises(AlertPacketError, match=r"does not fit schema 11\.1"):
        serialize(broken)
    with pytest.raises(AlertPacketError, match="invalid under schema"):
        AlertSchema.latest().validate(broken)


def test_local_sink_is_atomic_and_idempotent(tmp_path: Path, alerts: list[dict]) -> None:
    sink = LocalAlertSink(tmp_path / "outbox")
    packets = [serialize(a) for a in alerts]
    sink.deliver(2026112100001, "R22_S11", packets)
    assert sink.read(2026112100001, "R22_S11") == packets
    # Re-delivery replaces: never duplicates.
    sink.deliver(2026112100001, "R22_S11", packets[:3])
    sink.deliver(2026112100001, "R22_S11", packets[:3])
    assert sink.read(2026112100001, "R22_S11") == packets[:3]
    sink.deliver(2026112100001, 94, [])
    assert sink.read(2026112100001, 94) == []
    files = sorted(p.name for p in (tmp_path / "outbox" / "2026112100001").iterdir())
    assert files == ["2026112100001_94.alerts", "2026112100001_R22_S11.alerts"]
    assert [deserialize(p)["diaSourceId"] for p in sink.read(2026112100001, "R22_S11")] == [
        a["diaSourceId"] for a in alerts[:3]
    ]
    with pytest.raises(NotFoundError):
        sink.read(2026112100001, "R00_S00")
    with pytest.raises(UserInputError, match="safe file-name"):
        sink.deliver(2026112100001, "../etc", packets)
    path = sink.path(2026112100001, "R22_S11")
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(StorageError, match="truncated"):
        sink.read(2026112100001, "R22_S11")
