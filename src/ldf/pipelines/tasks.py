"""The science pipelines as ``lsst.pipe.base`` PipelineTasks, so batch campaigns run the same code.

Prompt Processing calls the plain functions of :mod:`ldf.pipelines` directly from its warm
workers; the Data Release Production and any reprocessing campaign (LDM-230 §2.6, §3) run
through Rubin's middleware instead — ``pipetask`` or ``SimplePipelineExecutor`` on one node,
``ctrl_bps`` on a cluster — which reads inputs from and writes outputs to a Butler repository
and records the provenance of every quantum. The two tasks here are thin wrappers: the
science stays in :func:`ldf.pipelines.singleframe.single_frame`,
:meth:`ldf.pipelines.templates.TemplateStore.warp_to`, :func:`ldf.pipelines.diffim.subtract`
and :func:`ldf.pipelines.dia.detect_dia_sources`, so both paths give the same numbers (the
tests check that bit for bit). The middleware's model — tasks declaring their inputs and
outputs as connections, quanta planned from the registry, datasets read and written through
the Butler with provenance — is that of Jenness et al. 2022, "The Vera C. Rubin
Observatory Data Butler and Pipeline Execution System", Proc. SPIE 12189, 1218911.

============================  ===============================================================
task (default label)          quantum: one (instrument, exposure, detector)
============================  ===============================================================
:class:`SingleFrameTask`      ``raw`` (LdfRawImage) → ``ldf_calexp`` (LdfExposure: ISR,
``singleFrame``               background-subtracted, PSF, fitted WCS, zero point),
                              ``ldf_image_quality`` (StructuredDataDict: seeing, PSF shape,
                              sky, pointing offset, zero point…), ``ldf_src`` (DataFrame:
                              characterization's source table)
:class:`DifferenceImageTask`  ``ldf_calexp`` (+ ``ldf_src`` for the kernel stamps, as Prompt
``differenceImage``           Processing does) → ``ldf_difference`` (LdfExposure),
                              ``ldf_dia_sources`` (DataFrame, APDB column names)
============================  ===============================================================

The data IDs are exposures, not visits: ldf's repositories define no ``visit`` dimension
records (obs_base's ``define-visits`` is not available without afw), and every ldf visit is
one exposure, so ``exposure`` identifies the same thing.

Inputs that are not in the Butler yet
    Master calibrations, the reference catalogue and the templates are read from the
    directories named in the task configs (``calib_root``, ``refcat_root``,
    ``template_root``), in the layout Prompt Processing uses (:mod:`ldf.prompt.inputs`:
    ``<calib_root>/<instrument>/<detector>/{bias,dark,flat-<band>}.fits``, a
    :class:`~ldf.pipelines.refcat.RefcatStore` and a
    :class:`~ldf.pipelines.templates.TemplateStore`). The next step is to move them into the
    repository as PrerequisiteInputs — calibrations in CALIBRATION collections with validity
    ranges (``bias``/``dark``/``flat`` found by the exposure's timespan), the refcat as
    HTM-sharded datasets and the templates as (band, patch) datasets — which needs a
    ``skymap``/``htm7`` dimension setup and a storage class per product.

Failures
    A per-detector :class:`~ldf.pipelines.types.DetectorError` becomes a
    :class:`DetectorAlgorithmError`, an ``lsst.pipe.base.AlgorithmError`` whose ``metadata``
    holds the stage and the reason: the quantum fails as a *repeatable* error (exit code 20:
    retrying the same data will not help), its outputs are not written, and the detector's
    downstream quanta cannot run; an executor that does not stop at the first failure
    (``pipetask`` without ``--fail-fast``) goes on with the other detectors.
    ``SimplePipelineExecutor`` raises it at once. Exposures that are not science exposures
    (biases, darks, flats in the same collection) raise ``NoWorkFound``: nothing to do, not
    a failure.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from lsst.pex.config import ChoiceField, Field
from lsst.pipe.base import (
    AlgorithmError,
    InputQuantizedConnection,
    NoWorkFound,
    OutputQuantizedConnection,
    Pipeline,
    PipelineTask,
    PipelineTaskConfig,
    PipelineTaskConnections,
    QuantumContext,
    Struct,
)
from lsst.pipe.base import connectionTypes as cT

from ldf.butler.formatters import EXPOSURE_STORAGE_CLASS, RAW_STORAGE_CLASS, RawImage
from ldf.pipelines import dia, diffim
from ldf.pipelines.calibs import CalibSet, MasterCalib
from ldf.pipelines.refcat import RefcatStore
from ldf.pipelines.singleframe import StageTimer, plain_quality, single_frame
from ldf.pipelines.templates import TemplateStore
from ldf.pipelines.types import DetectorError, Exposure, VisitInfo
from ldf.sim.instruments import get_instrument

__all__ = [
    "DIFFERENCE_IMAGE_LABEL",
    "SINGLE_FRAME_LABEL",
    "DetectorAlgorithmError",
    "DifferenceImageConfig",
    "DifferenceImageConnections",
    "DifferenceImageTask",
    "SingleFrameConfig",
    "SingleFrameConnections",
    "SingleFrameTask",
    "calib_path",
    "load_calibs",
    "make_pipeline",
    "pipeline_yaml",
    "plain_quality",
]

QUANTUM_DIMENSIONS = ("instrument", "exposure", "detector")
"""Dimensions of every quantum and dataset of these tasks (one detector of one exposure)."""
SINGLE_FRAME_LABEL = "singleFrame"
"""Label of :class:`SingleFrameTask` in :func:`make_pipeline`."""
DIFFERENCE_IMAGE_LABEL = "differenceImage"
"""Label of :class:`DifferenceImageTask` in :func:`make_pipeline`."""
_SCIENCE_TYPES = ("science",)


class DetectorAlgorithmError(AlgorithmError):
    """A detector cannot be processed: a :class:`DetectorError` as pipe_base reports it.

    Parameters
    ----------
    error
        The pipeline's error (stage and reason).
    where
        The quantum's data ID, for the message.
    """

    def __init__(self, error: DetectorError, where: str) -> None:
        super().__init__(f"{where}: {error.stage}: {error.reason}")
        self.stage = error.stage
        self.reason = error.reason

    @property
    def metadata(self) -> dict[str, str]:
        """``stage`` and ``reason``, recorded in the task metadata of the failed quantum."""
        return {"stage": self.stage, "reason": self.reason}


def _run_quantum(
    task: PipelineTask,
    butlerQC: QuantumContext,
    inputRefs: InputQuantizedConnection,
    outputRefs: OutputQuantizedConnection,
) -> None:
    """``runQuantum`` of both tasks: get, run, put (DetectorError → DetectorAlgorithmError)."""
    inputs = butlerQC.get(inputRefs)
    try:
        outputs = task.run(**inputs)
    except DetectorError as exc:
        data_id = butlerQC.quantum.dataId
        where = (
            " ".join(f"{k}={v}" for k, v in data_id.required.items())
            if data_id is not None
            else "?"
        )
        task.log.warning("%s failed in %s: %s", where, exc.stage, exc.reason)
        raise DetectorAlgorithmError(exc, where) from exc
    butlerQC.put(outputs, outputRefs)


# ------------------------------------------------------------------------------- inputs


def calib_path(
    calib_root: str | Path, instrument: str, detector: str, kind: str, band: str | None = None
) -> Path:
    """Where a master calibration is under ``calib_root`` (Prompt Processing's layout).

    ``<calib_root>/<instrument>/<detector>/bias.fits``, ``dark.fits``, ``flat-<band>.fits``,
    the layout of :meth:`ldf.prompt.inputs.InputPaths.calib` with ``calib_root`` =
    ``$LDF_HOME/calibs``.
    """
    if kind == "flat":
        if not band:
            raise DetectorError("isr", f"{detector}: a flat needs a band")
        name = f"flat-{band}.fits"
    else:
        name = f"{kind}.fits"
    return Path(calib_root) / instrument / detector / name


def load_calibs(calib_root: str | Path, info: VisitInfo) -> CalibSet:
    """The master bias, dark and flat (of the exposure's band) a science exposure needs.

    Raises
    ------
    DetectorError
        A master calibration is missing or unreadable (stage 'isr').
    """

    def one(kind: str, band: str | None = None) -> MasterCalib:
        path = calib_path(calib_root, info.instrument, info.detector, kind, band)
        if not path.is_file():
            what = f"{band}-band flat" if kind == "flat" else kind
            raise DetectorError(
                "isr",
                f"no master {what} for {info.instrument} {info.detector}: {path} does not "
                "exist (make it with `ldf calibs build`)",
            )
        return MasterCalib.load(path)

    if not info.band:
        raise DetectorError("isr", f"{info.detector}: the raw names no band; cannot flat-field")
    return CalibSet(bias=one("bias"), dark=one("dark"), flat=one("flat", info.band))


# ------------------------------------------------------------------------------- single frame


class SingleFrameConnections(PipelineTaskConnections, dimensions=QUANTUM_DIMENSIONS):
    """Connections of :class:`SingleFrameTask`."""

    raw = cT.Input(
        doc="One detector's raw readout (multi-extension FITS, ldf.butler.formatters.RawImage).",
        name="raw",
        storageClass=RAW_STORAGE_CLASS,
        dimensions=QUANTUM_DIMENSIONS,
    )
    calexp = cT.Output(
        doc="Calibrated exposure: ISR, background subtracted, PSF, fitted WCS, zero point.",
        name="ldf_calexp",
        storageClass=EXPOSURE_STORAGE_CLASS,
        dimensions=QUANTUM_DIMENSIONS,
    )
    image_quality = cT.Output(
        doc="Image-quality parameters (SingleFrame.quality(): seeing, PSF shape, sky, "
        "pointing offset, astrometric rms, zero point).",
        name="ldf_image_quality",
        storageClass="StructuredDataDict",
        dimensions=QUANTUM_DIMENSIONS,
    )
    sources = cT.Output(
        doc="Characterization's source table (pixel positions, electrons; see "
        "ldf.pipelines.characterize).",
        name="ldf_src",
        storageClass="DataFrame",
        dimensions=QUANTUM_DIMENSIONS,
    )


class SingleFrameConfig(PipelineTaskConfig, pipelineConnections=SingleFrameConnections):
    """Configuration of :class:`SingleFrameTask`."""

    calib_root = Field[str](
        doc="Directory of the master calibrations, <calib_root>/<instrument>/<detector>/"
        "{bias,dark,flat-<band>}.fits (Prompt Processing's $LDF_HOME/calibs).",
        default=None,
        optional=False,
    )
    refcat_root = Field[str](
        doc="Directory of the HTM-sharded reference catalogue (ldf.pipelines.refcat."
        "RefcatStore; Prompt Processing's $LDF_HOME/refcat).",
        default=None,
        optional=False,
    )
    camera_scale = Field[float](
        doc="Scale of the camera description ldf.sim.instruments.get_instrument(name, scale). "
        "Only gains, saturation and read noise are taken from it (the same at every scale; the "
        "geometry comes from the raw's headers), so 1.0 is right for any raw.",
        default=1.0,
        check=lambda s: 0.0 < s <= 1.0,
    )


class SingleFrameTask(PipelineTask):
    """ISR → characterization → astrometry → photometry of one detector's raw.

    A thin wrapper of :func:`ldf.pipelines.singleframe.single_frame`. Master calibrations
    and the reference catalogue are read from ``config.calib_root`` and
    ``config.refcat_root`` for now (see the module docstring: Butler calibration
    collections are the next step). Stage timings (seconds) go to the task metadata under
    ``seconds``.
    """

    ConfigClass = SingleFrameConfig
    config: SingleFrameConfig
    _DefaultName = "singleFrame"

    def run(
        self,
        raw: RawImage,
        calibs: CalibSet | None = None,
        refcat: RefcatStore | None = None,
    ) -> Struct:
        """Process one raw.

        Parameters
        ----------
        raw
            The raw readout.
        calibs, refcat
            Override the master calibrations and reference catalogue of the config (tests,
            notebooks).

        Returns
        -------
        lsst.pipe.base.Struct
            ``calexp`` (Exposure), ``image_quality`` (dict), ``sources`` (DataFrame).

        Raises
        ------
        DetectorError
            A missing calibration, too few stars…: whatever stage cannot go on.
        lsst.pipe.base.NoWorkFound
            The raw is not a science exposure.
        """
        info = VisitInfo.from_header(raw.metadata)
        if info.obs_type not in _SCIENCE_TYPES:
            raise NoWorkFound(
                f"{info.exposure_id} {info.detector} is a {info.obs_type} exposure, not science"
            )
        camera = get_instrument(info.instrument, self.config.camera_scale)
        if calibs is None:
            calibs = load_calibs(self.config.calib_root, info)
        if refcat is None:
            refcat = RefcatStore(self.config.refcat_root)
        timer = StageTimer()
        frame = single_frame(raw, camera, calibs, refcat, timer=timer)
        quality = plain_quality(frame.quality())
        self.metadata["seconds"] = dict(timer.seconds)
        self.log.info(
            "%s %s: seeing %.2f″, zero point %.3f, %d sources, %d astrometric matches (%.2f s)",
            info.exposure_id,
            info.detector,
            frame.characterization.seeing_arcsec,
            frame.photometry.zero_point,
            frame.characterization.n_sources,
            frame.astrometry.n_matched,
            sum(timer.seconds.values()),
        )
        return Struct(
            calexp=frame.exposure,
            image_quality=quality,
            sources=frame.characterization.sources,
        )

    def runQuantum(  # noqa: N802 - pipe_base's method name
        self,
        butlerQC: QuantumContext,
        inputRefs: InputQuantizedConnection,
        outputRefs: OutputQuantizedConnection,
    ) -> None:
        """Read the raw, :meth:`run`, write the outputs; see the module docstring for errors."""
        _run_quantum(self, butlerQC, inputRefs, outputRefs)


# ------------------------------------------------------------------------------- difference


class DifferenceImageConnections(PipelineTaskConnections, dimensions=QUANTUM_DIMENSIONS):
    """Connections of :class:`DifferenceImageTask` (``sources`` only with ``use_sources``)."""

    calexp = cT.Input(
        doc="Calibrated exposure with PSF, WCS and zero point (SingleFrameTask).",
        name="ldf_calexp",
        storageClass=EXPOSURE_STORAGE_CLASS,
        dimensions=QUANTUM_DIMENSIONS,
    )
    sources = cT.Input(
        doc="The calexp's source table: kernel stamps are chosen from it.",
        name="ldf_src",
        storageClass="DataFrame",
        dimensions=QUANTUM_DIMENSIONS,
    )
    difference = cT.Output(
        doc="PSF-matched difference image (science electrons, science WCS and zero point).",
        name="ldf_difference",
        storageClass=EXPOSURE_STORAGE_CLASS,
        dimensions=QUANTUM_DIMENSIONS,
    )
    dia_sources = cT.Output(
        doc="DiaSources measured on the difference (APDB column names, nJy).",
        name="ldf_dia_sources",
        storageClass="DataFrame",
        dimensions=QUANTUM_DIMENSIONS,
    )

    config: DifferenceImageConfig

    def __init__(self, *, config: PipelineTaskConfig | None = None) -> None:
        if not self.config.use_sources:
            del self.sources


class DifferenceImageConfig(PipelineTaskConfig, pipelineConnections=DifferenceImageConnections):
    """Configuration of :class:`DifferenceImageTask`."""

    template_root = Field[str](
        doc="Directory of the template store (ldf.pipelines.templates.TemplateStore, "
        "<template_root>/<band>/patch_*.fits; Prompt Processing's $LDF_HOME/templates).",
        default=None,
        optional=False,
    )
    use_sources = Field[bool](
        doc="Choose the kernel stamps from the calexp's source table (ldf_src), as Prompt "
        "Processing does; otherwise stars are found on the image with sep.",
        default=True,
    )
    mode = ChoiceField[str](
        doc="Which image is convolved.",
        default="auto",
        allowed={
            "auto": "the one with the narrower PSF",
            diffim.CONVOLVE_TEMPLATE: "the template",
            diffim.CONVOLVE_SCIENCE: "the science exposure",
        },
    )
    min_template_coverage = Field[float](
        doc="Fewest fraction of the detector the templates must cover.",
        default=0.2,
        check=lambda f: 0.0 < f <= 1.0,
    )
    detection_threshold = Field[float](
        doc="DiaSource detection threshold on the matched-filter |S/N| (Prompt Processing's "
        "policy default is 5).",
        default=5.0,
        check=lambda t: t > 0,
    )
    min_reliability = Field[float](
        doc="DiaSources with a lower reliability score are dropped (0 keeps every detection).",
        default=dia.RELIABILITY_CUT,
        check=lambda r: 0.0 <= r <= 1.0,
    )


class DifferenceImageTask(PipelineTask):
    """Template warp → PSF-matched subtraction → DiaSource detection and measurement.

    A thin wrapper of :meth:`ldf.pipelines.templates.TemplateStore.warp_to`,
    :func:`ldf.pipelines.diffim.subtract` and :func:`ldf.pipelines.dia.detect_dia_sources`.
    Templates are read from ``config.template_root`` (see the module docstring). Stage
    timings (seconds) and the kernel fit's figures go to the task metadata.
    """

    ConfigClass = DifferenceImageConfig
    config: DifferenceImageConfig
    _DefaultName = "differenceImage"

    def run(
        self,
        calexp: Exposure,
        sources: pd.DataFrame | None = None,
        templates: TemplateStore | None = None,
    ) -> Struct:
        """Subtract the template from one calibrated exposure and measure what changed.

        Parameters
        ----------
        calexp
            Calibrated exposure (PSF, WCS, zero point).
        sources
            Its source table (kernel stamps); None: found with sep.
        templates
            Override the template store of the config.

        Returns
        -------
        lsst.pipe.base.Struct
            ``difference`` (Exposure), ``dia_sources`` (DataFrame), and, not written,
            ``template`` (the warped template) and ``result`` (the DifferenceResult).

        Raises
        ------
        DetectorError
            No band, no template coverage, too few kernel stars…
        """
        info = calexp.info
        if not info.band:
            raise DetectorError("diffim", f"{info.detector}: the exposure names no band")
        if calexp.wcs is None:
            raise DetectorError("diffim", f"{info.detector} of {info.exposure_id} has no WCS")
        store = templates or TemplateStore(self.config.template_root)
        timer = StageTimer()
        with timer("warp"):
            template = store.warp_to(
                info.band,
                calexp.wcs,
                calexp.shape,
                info=info,
                min_coverage=self.config.min_template_coverage,
            )
        with timer("subtract"):
            result = diffim.subtract(calexp, template, sources=sources, mode=self.config.mode)
        with timer("dia"):
            dia_sources = dia.detect_dia_sources(
                result.difference,
                calexp,
                result.template,
                threshold=self.config.detection_threshold,
                min_reliability=self.config.min_reliability,
            )
        self.metadata["seconds"] = dict(timer.seconds)
        self.metadata["kernel"] = {
            "mode": result.mode,
            "n_stamps": result.n_stamps,
            "quality": float(result.quality),
            "kernel_sum": float(result.kernel_sum),
        }
        self.metadata["n_dia_sources"] = len(dia_sources)
        self.log.info(
            "%s %s: %s with %d stamps (quality %.2f), %d DiaSources (%.2f s)",
            info.exposure_id,
            info.detector,
            result.mode,
            result.n_stamps,
            result.quality,
            len(dia_sources),
            sum(timer.seconds.values()),
        )
        return Struct(
            difference=result.difference,
            dia_sources=dia_sources,
            template=result.template,
            result=result,
        )

    def runQuantum(  # noqa: N802 - pipe_base's method name
        self,
        butlerQC: QuantumContext,
        inputRefs: InputQuantizedConnection,
        outputRefs: OutputQuantizedConnection,
    ) -> None:
        """Read the calexp (and sources), :meth:`run`, write the outputs."""
        _run_quantum(self, butlerQC, inputRefs, outputRefs)


# ------------------------------------------------------------------------------- pipeline


def pipeline_yaml(
    calib_root: str | Path,
    refcat_root: str | Path,
    template_root: str | Path,
    *,
    camera_scale: float = 1.0,
    detection_threshold: float = 5.0,
) -> str:
    """The two-task pipeline as a pipeline YAML document (for ``pipetask run -p`` or bps).

    Parameters
    ----------
    calib_root, refcat_root, template_root
        Where the master calibrations, reference catalogue and templates are (e.g.
        ``$LDF_HOME/calibs``, ``…/refcat``, ``…/templates``).
    camera_scale
        :attr:`SingleFrameConfig.camera_scale`.
    detection_threshold
        :attr:`DifferenceImageConfig.detection_threshold`.
    """
    doc = {
        "description": "ldf single-frame processing and difference imaging (ldf.pipelines.tasks)",
        "tasks": {
            SINGLE_FRAME_LABEL: {
                "class": f"{SingleFrameTask.__module__}.SingleFrameTask",
                "config": {
                    "calib_root": str(calib_root),
                    "refcat_root": str(refcat_root),
                    "camera_scale": float(camera_scale),
                },
            },
            DIFFERENCE_IMAGE_LABEL: {
                "class": f"{DifferenceImageTask.__module__}.DifferenceImageTask",
                "config": {
                    "template_root": str(template_root),
                    "detection_threshold": float(detection_threshold),
                },
            },
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


def make_pipeline(
    calib_root: str | Path,
    refcat_root: str | Path,
    template_root: str | Path,
    *,
    camera_scale: float = 1.0,
    detection_threshold: float = 5.0,
) -> Pipeline:
    """The two-task pipeline (see :func:`pipeline_yaml`) as an ``lsst.pipe.base.Pipeline``."""
    return Pipeline.fromString(
        pipeline_yaml(
            calib_root,
            refcat_root,
            template_root,
            camera_scale=camera_scale,
            detection_threshold=detection_threshold,
        )
    )
