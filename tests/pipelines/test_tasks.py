"""The pipelines as PipelineTasks: a two-task pipeline run by SimplePipelineExecutor on a Butler.

One science visit (two quarter-size detectors) and a bias are ingested into a fresh
repository; masters, reference catalogue and templates are made the quick way (masters from
simulated calibration raws, templates coadded from three simulated visits a year earlier).
The outputs must be in the Butler, read back with the right types, and be the same numbers
as calling the plain functions directly on the same raws: the wrappers add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from lsst.daf.butler import Butler, DatasetRef
from lsst.pex.config import FieldValidationError
from lsst.pipe.base import NoWorkFound, QuantumSuccessCaveats
from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

from ldf.butler.formatters import (
    EXPOSURE_STORAGE_CLASS,
    RawImage,
    read_exposure,
    read_exposure_metadata,
    write_exposure,
)
from ldf.butler.records import RawRecord
from ldf.butler.repo import ButlerRepo
from ldf.pipelines import dia, diffim
from ldf.pipelines.calibs import make_master_bias, make_master_dark, make_master_flat
from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.singleframe import single_frame
from ldf.pipelines.tasks import (
    DIFFERENCE_IMAGE_LABEL,
    SINGLE_FRAME_LABEL,
    DetectorAlgorithmError,
    DifferenceImageConfig,
    DifferenceImageConnections,
    DifferenceImageTask,
    SingleFrameConfig,
    SingleFrameTask,
    calib_path,
    load_calibs,
    make_pipeline,
    plain_quality,
)
from ldf.pipelines.templates import SkyMap, TemplateStore, build_template
from ldf.pipelines.types import DetectorError, Exposure, Mask, PsfModel, VisitInfo
from ldf.prompt.inputs import InputPaths
from ldf.sim.instruments import Instrument, get_instrument
from ldf.sim.models import ObsType, VisitSpec
from ldf.sim.sky import Sky
from ldf.sim.wcs import detector_wcs
from tests.pipelines.conftest import (
    SEED,
    expected_zero_point,
    make_visit,
    sim_exposure,
    write_sim_raw,
)
from tests.pipelines.test_calibs import raw_image
from tests.pipelines.test_templates import (
    SCIENCE_MJD,
    TEMPLATE_SEEING,
    calibrated_copy,
    field_visit,
    psf_model,
    template_visits,
)

DETECTORS = ("R22_S11", "R22_S12")
UNCALIBRATED = "R22_S10"
"""A detector whose raw is ingested but that has no master calibrations."""
OUTPUT = "u/ldf/tasks-test"


@dataclass
class Campaign:
    """A repository with raws, the inputs on disk, and the executed pipeline."""

    root: Path
    camera: Instrument
    visit: VisitSpec
    bias_exposure: int
    raws: dict[str, Path]
    calib_root: Path
    refcat_root: Path
    template_root: Path
    butler: Butler
    n_quanta: int
    """Quanta executed (the bias's included: they found no work)."""


def _make_masters(camera: Instrument, detector: str, calib_root: Path) -> None:
    det = camera.detector(detector)
    biases = [raw_image(camera, det, make_visit(ObsType.BIAS, seq_num=10 + k))[0] for k in range(3)]
    darks = [
        raw_image(
            camera, det, make_visit(ObsType.DARK, band=None, exp_time_s=30.0, seq_num=20 + k)
        )[0]
        for k in range(3)
    ]
    flats = [
        raw_image(camera, det, make_visit(ObsType.FLAT, exp_time_s=10.0, seq_num=30 + k))[0]
        for k in range(3)
    ]
    bias = make_master_bias(biases, camera)
    dark = make_master_dark(darks, camera, bias)
    flat = make_master_flat(flats, camera, bias, dark)
    bias.save(calib_path(calib_root, camera.name, detector, "bias"))
    dark.save(calib_path(calib_root, camera.name, detector, "dark"))
    flat.save(calib_path(calib_root, camera.name, detector, "flat", "r"))


def _make_templates(camera: Instrument, sky: Sky, root: Path) -> None:
    """Coadd three template-epoch visits of both detectors onto every patch they touch."""
    store = TemplateStore(root, SkyMap())
    exps = [
        calibrated_copy(camera, camera.detector(d), v, sky)[0]
        for d in DETECTORS
        for v in template_visits(seeing=TEMPLATE_SEEING[:3])
    ]
    patches = set()
    for e in exps:
        assert e.wcs is not None
        patches.update(store.skymap.patches_overlapping(e.wcs, e.shape))
    for patch in sorted(patches):
        store.save(build_template(exps, store.skymap, patch, "r"))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, small_camera: Instrument) -> Campaign:
    """Inputs prepared, raws ingested, the two-task pipeline run on two detectors."""
    root = tmp_path_factory.mktemp("tasks")
    sky = Sky(SEED, star_density_scale=3.0, transient_rate_deg2=20000.0)
    calib_root, refcat_root, template_root = root / "calibs", root / "refcat", root / "templates"
    for det in DETECTORS:
        _make_masters(small_camera, det, calib_root)
    RefcatStore(refcat_root).ingest_region(sky, 150.0, -30.0, 0.2)
    _make_templates(small_camera, sky, template_root)

    visit = field_visit(1, SCIENCE_MJD, 0.85, 3.0, -2.0)
    bias = make_visit(ObsType.BIAS, seq_num=2)
    raw_dir = root / "raws"
    raw_dir.mkdir()
    raws = {
        d: write_sim_raw(raw_dir, small_camera, small_camera.detector(d), visit, sky)[0]
        for d in (*DETECTORS, UNCALIBRATED)
    }
    bias_path = write_sim_raw(raw_dir, small_camera, small_camera.detector(DETECTORS[0]), bias, sky)
    with ButlerRepo.create(root / "repo") as repo:
        repo.ingest_raws([RawRecord.from_file(p) for p in [*raws.values(), bias_path[0]]])

    butler = SimplePipelineExecutor.prep_butler(
        str(root / "repo"), inputs=["LSSTCam/raw/all"], output=OUTPUT
    )
    executor = SimplePipelineExecutor.from_pipeline(
        make_pipeline(calib_root, refcat_root, template_root),
        where="instrument = 'LSSTCam' AND exposure IN (:exposures) AND detector IN (:detectors)",
        bind={
            "exposures": [visit.exposure_id, bias.exposure_id],
            "detectors": [small_camera.detector(d).id for d in DETECTORS],
        },
        butler=butler,
    )
    quanta = executor.run(register_dataset_types=True)
    return Campaign(
        root,
        small_camera,
        visit,
        bias.exposure_id,
        raws,
        calib_root,
        refcat_root,
        template_root,
        butler,
        len(quanta),
    )


def assert_same_wcs(a: Exposure, b: Exposure) -> None:
    """Same sky position (to 1e-11°, 0.04 µas) at the corners and the centre of the grid."""
    assert a.wcs is not None
    assert b.wcs is not None
    ny, nx = b.shape
    x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, nx / 2])
    y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, ny / 2])
    np.testing.assert_allclose(
        a.wcs.wcs_pix2world(x, y, 0), b.wcs.wcs_pix2world(x, y, 0), rtol=0, atol=1e-11
    )


def _data_id(c: Campaign, detector: str, exposure: int | None = None) -> dict[str, object]:
    return {
        "instrument": "LSSTCam",
        "exposure": exposure or c.visit.exposure_id,
        "detector": c.camera.detector(detector).id,
    }


def _ref(c: Campaign, dataset_type: str, detector: str) -> DatasetRef:
    ref = c.butler.find_dataset(dataset_type, _data_id(c, detector), collections=OUTPUT)
    assert ref is not None, f"no {dataset_type} for {detector}"
    return ref


# ------------------------------------------------------------------------------- the pipeline


def test_outputs_are_in_the_butler_with_their_types(campaign: Campaign) -> None:
    c = campaign
    # Two tasks × (two science detector-exposures + the bias's one detector).
    assert c.n_quanta == 2 * (len(DETECTORS) + 1)
    for name in ("ldf_calexp", "ldf_image_quality", "ldf_src", "ldf_difference", "ldf_dia_sources"):
        refs = c.butler.query_datasets(name, collections=OUTPUT)
        assert sorted(r.dataId["detector"] for r in refs) == sorted(
            c.camera.detector(d).id for d in DETECTORS
        ), name
        assert all(r.dataId["exposure"] == c.visit.exposure_id for r in refs)
    # The bias exposure had nothing to do (NoWorkFound), which is not a failure.
    for label in (SINGLE_FRAME_LABEL, DIFFERENCE_IMAGE_LABEL):
        meta = c.butler.get(
            f"{label}_metadata", _data_id(c, DETECTORS[0], c.bias_exposure), collections=OUTPUT
        )
        assert (
            QuantumSuccessCaveats(int(meta["quantum"]["caveats"])) & QuantumSuccessCaveats.NO_WORK
        )
    assert c.butler.get_dataset_type("ldf_calexp").storageClass_name == EXPOSURE_STORAGE_CLASS
    det = DETECTORS[0]
    calexp = c.butler.get("ldf_calexp", _data_id(c, det), collections=OUTPUT)
    assert isinstance(calexp, Exposure)
    assert calexp.image.dtype == np.float32
    assert calexp.mask.dtype == np.uint16
    assert calexp.wcs is not None
    assert calexp.psf is not None
    assert calexp.info.detector == det
    assert isinstance(c.butler.get("ldf_image_quality", _data_id(c, det), collections=OUTPUT), dict)
    assert isinstance(c.butler.get("ldf_src", _data_id(c, det), collections=OUTPUT), pd.DataFrame)
    diff = c.butler.get("ldf_difference", _data_id(c, det), collections=OUTPUT)
    assert isinstance(diff, Exposure)
    assert diff.zero_point == calexp.zero_point
    assert isinstance(
        c.butler.get("ldf_dia_sources", _data_id(c, det), collections=OUTPUT), pd.DataFrame
    )


@pytest.mark.parametrize("detector", DETECTORS)
def test_tasks_give_what_the_plain_functions_give(campaign: Campaign, detector: str) -> None:
    c = campaign
    data_id = _data_id(c, detector)
    raw = RawImage.read(c.raws[detector])
    frame = single_frame(
        raw,
        get_instrument("LSSTCam", 1.0),
        load_calibs(c.calib_root, VisitInfo.from_header(raw.metadata)),
        RefcatStore(c.refcat_root),
    )
    calexp = c.butler.get("ldf_calexp", data_id, collections=OUTPUT)
    assert calexp.zero_point == frame.exposure.zero_point
    assert np.array_equal(calexp.image, frame.exposure.image)
    assert np.array_equal(calexp.variance, frame.exposure.variance)
    assert np.array_equal(calexp.mask, frame.exposure.mask)
    assert calexp.background_level == frame.exposure.background_level
    assert calexp.psf is not None
    assert frame.exposure.psf is not None
    assert calexp.psf.fwhm_px == frame.exposure.psf.fwhm_px
    np.testing.assert_array_equal(calexp.psf.image, frame.exposure.psf.image)
    assert_same_wcs(calexp, frame.exposure)
    assert calexp.wcs is not None
    assert frame.exposure.wcs is not None
    assert np.array_equal(calexp.wcs.wcs.cd, frame.exposure.wcs.wcs.cd)
    quality = c.butler.get("ldf_image_quality", data_id, collections=OUTPUT)
    assert quality == plain_quality(frame.quality())
    src = c.butler.get("ldf_src", data_id, collections=OUTPUT)
    pd.testing.assert_frame_equal(src, frame.characterization.sources)

    # The science is right, not just repeatable: the simulator's zero point and seeing.
    det = c.camera.detector(detector)
    assert calexp.zero_point == pytest.approx(expected_zero_point(c.camera, det, c.visit), abs=0.02)
    assert quality["seeing_arcsec"] == pytest.approx(0.85, rel=0.05)

    store = TemplateStore(c.template_root)
    science = frame.exposure
    assert science.wcs is not None
    assert science.info.band is not None
    template = store.warp_to(science.info.band, science.wcs, science.shape, info=science.info)
    result = diffim.subtract(science, template, sources=frame.characterization.sources)
    sources = dia.detect_dia_sources(result.difference, science, result.template)
    assert len(sources) > 10  # rich in transients: the comparison below means something
    dia_sources = c.butler.get("ldf_dia_sources", data_id, collections=OUTPUT)
    assert len(dia_sources) == len(sources)
    pd.testing.assert_frame_equal(dia_sources, sources)  # every column, value and dtype
    difference = c.butler.get("ldf_difference", data_id, collections=OUTPUT)
    assert np.array_equal(difference.image, result.difference.image)
    assert difference.metadata["DIFFNSTM"] == result.n_stamps


def test_provenance_components_and_task_metadata(campaign: Campaign) -> None:
    c = campaign
    det = DETECTORS[0]
    data_id = _data_id(c, det)
    calexp_ref = _ref(c, "ldf_calexp", det)
    raw_ref = c.butler.find_dataset("raw", data_id, collections="LSSTCam/raw/all")
    assert raw_ref is not None
    calexp = c.butler.get(calexp_ref)
    assert calexp.metadata["LSST BUTLER ID"] == str(calexp_ref.id)
    assert calexp.metadata["LSST BUTLER INPUT 0 ID"] == str(raw_ref.id)
    assert calexp.metadata["LSST BUTLER INPUT 0 DATASETTYPE"] == "raw"
    diff = c.butler.get("ldf_difference", data_id, collections=OUTPUT)
    # The difference's provenance replaced the calexp's, whose header it started from.
    assert diff.metadata["LSST BUTLER ID"] == str(_ref(c, "ldf_difference", det).id)
    assert str(calexp_ref.id) in {
        diff.metadata[f"LSST BUTLER INPUT {i} ID"]
        for i in range(int(diff.metadata["LSST BUTLER N_INPUTS"]))
    }
    # The raw's header travels with the calexp; the 'metadata' component reads no pixels.
    header = c.butler.get("ldf_calexp.metadata", data_id, collections=OUTPUT)
    assert isinstance(header, fits.Header)
    assert header["OBSID"] == c.visit.obs_id
    assert list(header.items()) == list(calexp.metadata.items())
    # Stage timings in the task metadata.
    meta = c.butler.get(f"{SINGLE_FRAME_LABEL}_metadata", data_id, collections=OUTPUT)
    seconds = meta[SINGLE_FRAME_LABEL]["seconds"]
    assert set(seconds) == {"isr", "characterize", "astrometry", "photometry"}
    meta = c.butler.get(f"{DIFFERENCE_IMAGE_LABEL}_metadata", data_id, collections=OUTPUT)
    assert meta[DIFFERENCE_IMAGE_LABEL]["n_dia_sources"] == len(
        c.butler.get("ldf_dia_sources", data_id, collections=OUTPUT)
    )
    assert set(meta[DIFFERENCE_IMAGE_LABEL]["seconds"]) == {"warp", "subtract", "dia"}


def test_missing_calibration_fails_the_quantum_with_the_reason(campaign: Campaign) -> None:
    c = campaign
    butler = SimplePipelineExecutor.prep_butler(
        str(c.root / "repo"), inputs=["LSSTCam/raw/all"], output="u/ldf/tasks-uncalibrated"
    )
    config = SingleFrameConfig()
    config.calib_root = str(c.calib_root)
    config.refcat_root = str(c.refcat_root)
    executor = SimplePipelineExecutor.from_task_class(
        SingleFrameTask,
        config=config,
        where="instrument = 'LSSTCam' AND exposure = :exposure AND detector = :detector",
        bind={"exposure": c.visit.exposure_id, "detector": c.camera.detector(UNCALIBRATED).id},
        butler=butler,
    )
    with pytest.raises(DetectorAlgorithmError) as caught:
        executor.run(register_dataset_types=True)
    err = caught.value
    assert err.stage == "isr"
    assert err.metadata == {"stage": "isr", "reason": err.reason}
    expected = calib_path(c.calib_root, "LSSTCam", UNCALIBRATED, "bias")
    assert str(expected) in err.reason
    assert "ldf calibs build" in err.reason
    assert f"detector={c.camera.detector(UNCALIBRATED).id}" in str(err)
    # Nothing was written for it.
    assert not butler.query_datasets(
        "ldf_calexp", collections="u/ldf/tasks-uncalibrated", explain=False
    )


# ------------------------------------------------------------------------------- pieces


def test_run_refuses_non_science_and_unusable_input(
    tmp_path: Path, small_camera: Instrument
) -> None:
    det = small_camera.detector(DETECTORS[0])
    raw, _ = raw_image(small_camera, det, make_visit(ObsType.BIAS, seq_num=3))
    config = SingleFrameConfig()
    config.calib_root = str(tmp_path / "calibs")
    config.refcat_root = str(tmp_path / "refcat")
    task = SingleFrameTask(config=config)
    with pytest.raises(NoWorkFound, match="bias exposure"):
        task.run(raw)
    science, _ = raw_image(small_camera, det, make_visit(seq_num=4))
    with pytest.raises(DetectorError, match="no master bias") as caught:
        task.run(science)
    assert caught.value.stage == "isr"

    dconfig = DifferenceImageConfig()
    dconfig.template_root = str(tmp_path / "templates")
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=5), Sky(SEED))
    exp.psf, exp.zero_point = psf_model(4.0), 28.0
    with pytest.raises(DetectorError, match=r"ldf templates build") as dcaught:
        DifferenceImageTask(config=dconfig).run(exp)
    assert dcaught.value.stage == "diffim"
    exp.wcs = None
    with pytest.raises(DetectorError, match="no WCS"):
        DifferenceImageTask(config=dconfig).run(exp)


def test_configs_need_their_directories_and_sources_can_be_left_out() -> None:
    with pytest.raises(FieldValidationError, match="calib_root"):
        SingleFrameConfig().validate()
    config = DifferenceImageConfig()
    config.template_root = "/somewhere"
    assert "sources" in DifferenceImageConnections(config=config).inputs
    config.use_sources = False
    assert "sources" not in DifferenceImageConnections(config=config).inputs
    with pytest.raises(FieldValidationError, match="detection_threshold"):
        config.detection_threshold = -1.0
    pipeline = make_pipeline("/c", "/r", "/t", detection_threshold=6.0)
    graph = pipeline.to_graph()
    assert set(graph.tasks) == {SINGLE_FRAME_LABEL, DIFFERENCE_IMAGE_LABEL}
    dconfig = graph.tasks[DIFFERENCE_IMAGE_LABEL].config
    assert isinstance(dconfig, DifferenceImageConfig)
    assert dconfig.detection_threshold == 6.0


def test_calib_layout_is_prompt_processings(tmp_path: Path) -> None:
    home = InputPaths(tmp_path)
    for kind, band in (("bias", None), ("dark", None), ("flat", "i")):
        assert calib_path(home.calibs, "LSSTCam", "R22_S11", kind, band) == home.calib(
            "LSSTCam", "R22_S11", kind, band
        )
    with pytest.raises(DetectorError, match="needs a band"):
        calib_path(home.calibs, "LSSTCam", "R22_S11", "flat")


def test_plain_quality_is_yaml_safe() -> None:
    q = plain_quality(
        {
            "a": np.float64(1.5),
            "b": float("nan"),
            "c": np.int64(3),
            "d": np.bool_(True),
            "e": "r",
            "f": False,
        }
    )
    assert q == {"a": 1.5, "b": None, "c": 3, "d": True, "e": "r", "f": False}
    assert q["f"] is False
    assert type(q["a"]) is float
    assert type(q["c"]) is int


# ------------------------------------------------------------------------------- formatter


def _exposure(small_camera: Instrument, **changes: object) -> Exposure:
    det = small_camera.detector("R22_S11")
    exp, _ = sim_exposure(small_camera, det, make_visit(seq_num=6), Sky(SEED))
    exp.wcs = detector_wcs(small_camera, det, 150.001, -29.999, 12.5)
    exp.psf = PsfModel(psf_model(4.1, 0.02, -0.01).image.astype(np.float64), 4.1, 0.02, -0.01)
    exp.zero_point = 28.123456789
    exp.background_level = 987.25
    exp.mask[3, 4] = np.uint16(0xFFFF)  # every bit, the top one too (int16 + BZERO on disk)
    exp.mask[5, 6] = np.uint16(Mask.CR | Mask.INTRP)
    exp.metadata["HIERARCH LDF ISR NCRPIX"] = 17
    exp.metadata["COMMENT"] = "kept"
    for key, value in changes.items():
        setattr(exp, key, value)
    return exp


def test_exposure_round_trip_keeps_everything(tmp_path: Path, small_camera: Instrument) -> None:
    exp = _exposure(small_camera)
    path = tmp_path / "exp.fits"
    write_exposure(exp, path)
    back = read_exposure(path)
    assert back.image.dtype == np.float32
    assert back.variance.dtype == np.float32
    assert back.mask.dtype == np.uint16
    assert back.image.dtype.isnative
    assert back.mask.dtype.isnative
    assert np.array_equal(back.image, exp.image)
    assert np.array_equal(back.variance, exp.variance)
    assert np.array_equal(back.mask, exp.mask)
    assert back.info == exp.info
    assert back.zero_point == exp.zero_point
    assert back.background_level == exp.background_level
    assert back.pixel_scale_arcsec == exp.pixel_scale_arcsec
    assert back.psf is not None
    assert exp.psf is not None
    assert back.psf.image.dtype == np.float64
    assert np.array_equal(back.psf.image, exp.psf.image)
    assert (back.psf.fwhm_px, back.psf.e1, back.psf.e2) == (4.1, 0.02, -0.01)
    assert back.wcs is not None
    assert exp.wcs is not None
    assert_same_wcs(back, exp)
    # Exactly: the linear part is written as exact doubles too (see _wcs_cards).
    assert np.array_equal(back.wcs.wcs.cd, exp.wcs.wcs.cd)
    assert np.array_equal(back.wcs.wcs.crval, exp.wcs.wcs.crval)
    assert back.wcs.pixel_shape == (exp.shape[1], exp.shape[0])
    assert list(back.metadata.items()) == list(exp.metadata.items())
    assert list(read_exposure_metadata(path).items()) == list(exp.metadata.items())
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "VARIANCE", "MASK", "PSF"]
        bits = {plane.name: hdul["MASK"].header[f"MP_{plane.name}"] for plane in Mask}
        assert bits["CR"] == 2
        assert bits["DETECTED_NEGATIVE"] == 5
        assert sorted(bits.values()) == list(range(len(Mask)))
        assert hdul["IMAGE"].header["CTYPE1"] == "RA---TAN"  # viewers see the WCS


def test_exposure_round_trip_without_calibration(tmp_path: Path, small_camera: Instrument) -> None:
    exp = _exposure(small_camera, wcs=None, psf=None, zero_point=None, background_level=None)
    path = tmp_path / "bare.fits"
    write_exposure(exp, path)
    back = read_exposure(path)
    assert back.wcs is None
    assert back.psf is None
    assert back.zero_point is None
    assert back.background_level is None
    assert back.info == exp.info
    # A PC + CDELT WCS (detector_wcs makes CD ones) written over a header that had an older
    # WCS: the new one wins, exactly.
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.123456789012345, 5.000000000000123]
    wcs.wcs.crpix = [-1234.5678901234, 40.25]
    wcs.wcs.cdelt = [-5.5555555555555556e-05, 5.5555555555555556e-05]
    wcs.wcs.pc = [[0.9998476951563913, -0.017452406437283512], [0.017452406437283512, 0.99985]]
    wcs.wcs.set()
    exp.wcs = wcs
    exp.metadata["CRVAL1"] = 99.0  # stale
    write_exposure(exp, path)
    back = read_exposure(path)
    assert back.wcs is not None
    assert_same_wcs(back, exp)
    assert np.array_equal(back.wcs.wcs.get_pc(), wcs.wcs.get_pc())
    assert np.array_equal(back.wcs.wcs.cdelt, wcs.wcs.cdelt)
    assert np.array_equal(back.wcs.wcs.crpix, wcs.wcs.crpix)
    assert "CRVAL1" not in back.metadata


def test_reading_a_non_exposure_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.fits"
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(path)
    with pytest.raises(ValueError, match="not an ldf exposure"):
        read_exposure(path)
    h = fits.Header()
    h["HIERARCH LDF EXP VERSION"] = 1
    fits.HDUList([fits.PrimaryHDU(header=h)]).writeto(path, overwrite=True)
    with pytest.raises(ValueError, match="no IMAGE, VARIANCE, MASK"):
        read_exposure(path)
    planes = [fits.ImageHDU(np.zeros((4, 4), np.float32), name=n) for n in ("IMAGE", "VARIANCE")]
    mask = fits.ImageHDU(np.zeros((4, 4), np.uint16), name="MASK")
    fits.HDUList([fits.PrimaryHDU(header=h), *planes, mask]).writeto(path, overwrite=True)
    with pytest.raises(ValueError, match="incomplete visit keywords: no LDF VISIT INSTRUMENT"):
        read_exposure(path)
    h["HIERARCH LDF EXP VERSION"] = 99
    fits.HDUList([fits.PrimaryHDU(header=h)]).writeto(path, overwrite=True)
    with pytest.raises(ValueError, match="version 99"):
        read_exposure(path)
