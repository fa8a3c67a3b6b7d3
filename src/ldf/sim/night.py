"""Run a simulated night: the scheduler announces visits, the camera reads them into the DAQ.

The night is a time-ordered stream of OCS events per instrument — ``nextVisit`` from the
scheduler, ``startIntegration`` and ``endReadout`` from the camera — with each exposure's
pixels in the DAQ before its ``endReadout`` goes out, exactly the contract Rubin's archiver
relies on. Rendering runs in a pool of warm worker processes that each keep the instrument
and the sky cached; it runs ahead of the event stream (bounded look-ahead) so the pool stays
busy in fast mode. In real-time mode events go out on the simulated clock (optionally sped up).

The night's truth table (every injected transient and variable, per detector and visit) is
written as ECSV next to the plan, for validation of prompt processing later.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from ldf.errors import UserInputError
from ldf.sim.daq import DaqStore, DetectorManifest
from ldf.sim.models import ObservingConditions, ObsType, VisitSpec
from ldf.sim.scheduler import NightPlan, PlannedExposure, plan_night

__all__ = [
    "EventSink",
    "ExposureResult",
    "InstrumentSummary",
    "NightOptions",
    "NightSummary",
    "run_night",
]

DEVICES = {
    "LSSTCam": ("MTScheduler", "MTCamera"),
    "LATISS": ("ATScheduler", "ATCamera"),
}
"""OCS device names of each instrument's scheduler and camera, as Rubin names its CSCs."""


IDLE_GAP_S = 120.0
"""In real-time mode, a gap between events longer than this passes in this long."""

LSSTCAM_SCIENCE_CCDS = 189
"""Science CCDs of LSSTCam."""


class EventSink(Protocol):
    """Where the observatory's events go (the OCS bus, or nowhere)."""

    def __call__(self, device: str, name: str, payload: dict[str, Any]) -> Awaitable[None]: ...


@dataclass(frozen=True)
class NightOptions:
    """What night to simulate."""

    day_obs: int
    """Observing day YYYYMMDD."""
    visits: int
    """LSSTCam science visits."""
    seed: int
    """Seed of the sky, the night plan and the noise."""
    scale: float = 1.0
    """Linear shrink of detector pixel counts (1 = full size)."""
    detectors: int | None = None
    """LSSTCam science detectors per exposure (nearest the centre); None: all 205 CCDs."""
    latiss_visits: int = 3
    """LATISS spectra of standard stars."""
    instruments: tuple[str, ...] = ("LSSTCam", "LATISS")
    """Instruments observing tonight."""
    calibrations: bool = True
    """Whether to take the afternoon calibration block."""
    realtime: bool = False
    """Publish events on the simulated clock instead of as fast as possible (idle gaps of
    more than `IDLE_GAP_S`, e.g. from the afternoon calibrations to twilight, are skipped)."""
    speed: float = 1.0
    """Real-time acceleration (2 = twice as fast as the sky)."""
    workers: int = 1
    """Rendering processes (0: render in this process)."""
    lookahead: int = 4
    """Exposures rendered ahead of the event stream."""
    sky: tuple[float, float, float] = (1.0, 20.0, 50.0)
    """The simulated sky: (star density scale, transients per deg² per 50-day epoch, periodic
    variables per deg²); see :class:`ldf.sim.sky.Sky`."""

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise UserInputError(f"--scale must be in (0, 1], got {self.scale}")
        if self.speed <= 0:
            raise UserInputError(f"--speed must be > 0, got {self.speed}")
        if self.visits < 0 or self.latiss_visits < 0:
            raise UserInputError("visit counts must be ≥ 0")
        if self.detectors is not None and not 1 <= self.detectors <= LSSTCAM_SCIENCE_CCDS:
            raise UserInputError(
                f"--detectors must be between 1 and {LSSTCAM_SCIENCE_CCDS}, got {self.detectors}"
            )
        unknown = set(self.instruments) - set(DEVICES)
        if unknown:
            raise UserInputError(f"unknown instrument(s): {', '.join(sorted(unknown))}")
        if self.workers < 0 or self.lookahead < 1:
            raise UserInputError("workers must be ≥ 0 and lookahead ≥ 1")


class ExposureResult(BaseModel):
    """One exposure read out into the DAQ."""

    instrument: str
    obs_id: str
    exposure_id: int
    obs_type: ObsType
    detectors: int
    nbytes: int
    truth_rows: int
    render_s: float = Field(description="Worker seconds spent rendering and writing.")


class InstrumentSummary(BaseModel):
    """A night's totals for one instrument."""

    exposures: int = 0
    by_type: dict[str, int] = Field(default_factory=dict)
    detector_files: int = 0
    nbytes: int = 0
    truth_rows: int = 0
    first_obs_id: str | None = None
    last_obs_id: str | None = None
    truth_table: str | None = None


class NightSummary(BaseModel):
    """What a simulated night produced."""

    day_obs: int
    seed: int
    scale: float
    daq_root: str
    instruments: dict[str, InstrumentSummary]
    wall_s: float
    render_s: float
    events: int
    megabytes_per_s: float


@dataclass
class _Task:
    instrument: str
    scale: float
    detector: str
    visit_json: str
    seed: int
    daq_root: str
    sky: tuple[float, float, float] = (1.0, 20.0, 50.0)


@lru_cache(maxsize=4)
def _instrument(name: str, scale: float) -> Any:
    from ldf.sim.instruments import get_instrument

    return get_instrument(name, scale=scale)


@lru_cache(maxsize=2)
def _sky(seed: int, params: tuple[float, float, float] = (1.0, 20.0, 50.0)) -> Any:
    from ldf.sim.sky import Sky

    stars, transients, variables = params
    return Sky(
        seed,
        star_density_scale=stars,
        transient_rate_deg2=transients,
        variable_density_deg2=variables,
    )


def render_to_daq(task: _Task) -> tuple[str, list[dict[str, Any]], int, float]:
    """Worker: render one detector of one exposure and write it into the DAQ.

    Returns the detector manifest (JSON), the truth rows, the bytes written, and seconds spent.
    """
    from ldf.sim.camera import render_detector

    t0 = time.perf_counter()
    inst = _instrument(task.instrument, task.scale)
    visit = VisitSpec.model_validate_json(task.visit_json)
    readout = render_detector(
        inst, inst.detector(task.detector), visit, _sky(task.seed, task.sky), seed=task.seed
    )
    manifest = DaqStore(Path(task.daq_root)).write_detector(visit, task.detector, readout.amps)
    rows = [r.model_dump(mode="json") for r in readout.truth]
    return manifest.model_dump_json(), rows, manifest.nbytes, time.perf_counter() - t0


def _conditions_model(visit: VisitSpec, seed: int) -> ObservingConditions:
    from ldf.sim.conditions import conditions_for

    return conditions_for(
        seed,
        visit.start_tai_mjd,
        visit.band or "r",
        visit.airmass,
        ra_deg=visit.ra_deg,
        dec_deg=visit.dec_deg,
    )


def detectors_for(instrument: str, scale: float, count: int | None) -> list[str]:
    """Detectors read out per exposure: the ``count`` science CCDs nearest the centre, or all."""
    inst = _instrument(instrument, scale)
    if instrument != "LSSTCam" or count is None:
        return [d.name for d in inst.detectors]
    science = sorted(inst.science_detectors(), key=lambda d: (d.fp_x_mm**2 + d.fp_y_mm**2, d.id))
    if not 1 <= count <= len(science):
        raise UserInputError(f"--detectors must be between 1 and {len(science)}, got {count}")
    return [d.name for d in sorted(science[:count], key=lambda d: d.id)]


@dataclass(order=True)
class _Event:
    mjd: float
    order: int
    name: str = field(compare=False)
    planned: PlannedExposure = field(compare=False)


def _timeline(plans: list[NightPlan]) -> list[_Event]:
    events = []
    for plan in plans:
        for p in plan.exposures:
            v = p.visit
            end_readout = v.end_tai_mjd + 2.0 / 86400
            events += [
                _Event(p.next_visit_tai_mjd, 0, "nextVisit", p),
                _Event(v.start_tai_mjd, 1, "startIntegration", p),
                _Event(end_readout, 2, "endReadout", p),
            ]
    return sorted(events)


def _visit_payload(p: PlannedExposure) -> dict[str, Any]:
    return p.visit.model_dump(mode="json")


async def run_night(
    options: NightOptions,
    daq: DaqStore,
    truth_dir: Path,
    *,
    sink: EventSink | None = None,
    on_exposure: Callable[[ExposureResult], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    pace: Callable[[str], Awaitable[None]] | None = None,
) -> NightSummary:
    """Simulate a night into the DAQ, publishing the observatory's events to ``sink``.

    Parameters
    ----------
    options
        What to simulate.
    daq
        Where the camera puts pixels.
    truth_dir
        Where to write ``<instrument>/<day_obs>/truth.ecsv`` and ``plan.json``.
    sink
        Receives every event (device, name, payload); None publishes nothing.
    on_exposure
        Called after each exposure is complete in the DAQ (for progress bars).
    on_plan
        Called once with (exposures, detector files) planned (for progress bars).
    pace
        Awaited with the instrument's name before each exposure starts, in fast mode: lets
        the facility hold the camera back while it is behind (the sky never outruns the
        facility as a fast simulator does).
    """
    t_wall0 = time.perf_counter()
    plans = []
    dets: dict[str, list[str]] = {}
    for name in options.instruments:
        n = options.visits if name == "LSSTCam" else options.latiss_visits
        plans.append(
            plan_night(
                name,
                day_obs=options.day_obs,
                science_visits=n,
                seed=options.seed,
                calibrations=options.calibrations,
                conditions=_conditions_model,
            )
        )
        dets[name] = detectors_for(name, options.scale, options.detectors)
    n_exp = sum(len(p.exposures) for p in plans)
    if on_plan:
        on_plan(n_exp, sum(len(p.exposures) * len(dets[p.instrument]) for p in plans))
    events = _timeline(plans)
    order = [e.planned for e in events if e.name == "startIntegration"]

    executor: Executor | None = None
    if options.workers > 0:
        executor = ProcessPoolExecutor(
            max_workers=options.workers, mp_context=multiprocessing.get_context("spawn")
        )
    pending: dict[str, list[Future[Any]]] = {}
    next_submit = 0
    truth: dict[str, list[dict[str, Any]]] = {name: [] for name in options.instruments}
    summaries = {name: InstrumentSummary() for name in options.instruments}
    render_s = 0.0
    nbytes = 0
    published = 0
    loop = asyncio.get_running_loop()

    def submit_until(index: int) -> None:
        nonlocal next_submit
        while next_submit < min(index, len(order)):
            p = order[next_submit]
            v = p.visit
            tasks = [
                _Task(
                    v.instrument,
                    options.scale,
                    d,
                    v.model_dump_json(),
                    options.seed,
                    str(daq.root),
                    options.sky,
                )
                for d in dets[v.instrument]
            ]
            if executor is not None:
                pending[v.obs_id] = [executor.submit(render_to_daq, t) for t in tasks]
            else:
                done: list[Future[Any]] = []
                for t in tasks:
                    f: Future[Any] = Future()
                    f.set_result(render_to_daq(t))
                    done.append(f)
                pending[v.obs_id] = done
            next_submit += 1

    async def publish(device: str, name: str, payload: dict[str, Any]) -> None:
        nonlocal published
        published += 1
        if sink is not None:
            await sink(device, name, payload)

    wall_of_mjd0 = time.time()
    mjd0 = events[0].mjd if events else 0.0
    skipped_s = 0.0  # simulated seconds of idle gaps skipped so far
    prev_mjd = mjd0
    started = 0
    try:
        for ev in events:
            if options.realtime:
                # Hours with nothing to observe (between the afternoon calibrations and
                # twilight, or between instruments' blocks) pass at once; the rest runs on
                # the simulated clock, sped up by ``speed``.
                gap_s = (ev.mjd - prev_mjd) * 86400
                if gap_s > IDLE_GAP_S:
                    skipped_s += gap_s - IDLE_GAP_S
                prev_mjd = ev.mjd
                sim_s = (ev.mjd - mjd0) * 86400 - skipped_s
                delay = wall_of_mjd0 + sim_s / options.speed - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            p = ev.planned
            v = p.visit
            scheduler, camera = DEVICES[v.instrument]
            if ev.name == "nextVisit":
                await publish(scheduler, "nextVisit", _visit_payload(p))
            elif ev.name == "startIntegration":
                if pace is not None and not options.realtime:
                    await pace(v.instrument)
                started += 1
                submit_until(started + options.lookahead)
                await publish(
                    camera,
                    "startIntegration",
                    {
                        "imageName": v.obs_id,
                        "exposureTime": v.exp_time_s,
                        "visit": _visit_payload(p),
                    },
                )
            else:
                futures = pending.pop(v.obs_id)
                outs = [await asyncio.wrap_future(f, loop=loop) for f in futures]
                manifests = [DetectorManifest.model_validate_json(o[0]) for o in outs]
                exp_bytes = sum(o[2] for o in outs)
                exp_rows = [row for o in outs for row in o[1]]
                exp_render = sum(o[3] for o in outs)
                daq.complete(
                    v, dets[v.instrument], [m.detector for m in manifests], ev.mjd, options.scale
                )
                await publish(
                    camera,
                    "endReadout",
                    {
                        "imageName": v.obs_id,
                        "imageDate": str(v.day_obs),
                        "imageNumber": v.seq_num,
                        "requestedExposureTime": v.exp_time_s,
                        "timestampEndOfReadout": ev.mjd,
                        "daqPath": str(daq.exposure_dir(v.instrument, v.day_obs, v.obs_id)),
                        "detectors": [m.detector for m in manifests],
                        "visit": _visit_payload(p),
                    },
                )
                truth[v.instrument].extend(exp_rows)
                s = summaries[v.instrument]
                s.exposures += 1
                s.by_type[v.obs_type.value] = s.by_type.get(v.obs_type.value, 0) + 1
                s.detector_files += len(manifests)
                s.nbytes += exp_bytes
                s.truth_rows += len(exp_rows)
                s.first_obs_id = s.first_obs_id or v.obs_id
                s.last_obs_id = v.obs_id
                render_s += exp_render
                nbytes += exp_bytes
                if on_exposure:
                    on_exposure(
                        ExposureResult(
                            instrument=v.instrument,
                            obs_id=v.obs_id,
                            exposure_id=v.exposure_id,
                            obs_type=v.obs_type,
                            detectors=len(manifests),
                            nbytes=exp_bytes,
                            truth_rows=len(exp_rows),
                            render_s=exp_render,
                        )
                    )
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    for plan in plans:
        path = _write_truth(truth_dir, plan, truth[plan.instrument])
        summaries[plan.instrument].truth_table = str(path)
    wall = time.perf_counter() - t_wall0
    return NightSummary(
        day_obs=options.day_obs,
        seed=options.seed,
        scale=options.scale,
        daq_root=str(daq.root),
        instruments=summaries,
        wall_s=round(wall, 3),
        render_s=round(render_s, 3),
        events=published,
        megabytes_per_s=round(nbytes / 1e6 / wall, 2) if wall > 0 else 0.0,
    )


TRUTH_COLUMNS = (
    "exposure_id", "detector", "kind", "source_id", "ra_deg", "dec_deg", "x", "y", "mag",
    "flux_e", "mjd",
)  # fmt: skip
"""Columns of the truth table, in order."""


def _write_truth(truth_dir: Path, plan: NightPlan, rows: list[dict[str, Any]]) -> Path:
    """Write the night's truth table (ECSV, via astropy) and the plan, atomically."""
    from astropy.table import Table

    d = truth_dir / plan.instrument / str(plan.day_obs)
    d.mkdir(parents=True, exist_ok=True)
    table = Table(rows=[[r[c] for c in TRUTH_COLUMNS] for r in rows] or None, names=TRUTH_COLUMNS)
    if not rows:
        table = Table(
            names=TRUTH_COLUMNS,
            dtype=["i8", "U16", "U16", "i8", "f8", "f8", "f8", "f8", "f8", "f8", "f8"],
        )
    table.meta["day_obs"] = plan.day_obs
    table.meta["instrument"] = plan.instrument
    path = d / "truth.ecsv"
    tmp = d / ".truth.ecsv.tmp"
    table.write(tmp, format="ascii.ecsv", overwrite=True)
    tmp.replace(path)
    plan_path = d / "plan.json"
    tmp_plan = d / ".plan.json.tmp"
    tmp_plan.write_text(
        json.dumps(
            [
                {
                    "next_visit_tai_mjd": p.next_visit_tai_mjd,
                    **p.visit.model_dump(mode="json"),
                }
                for p in plan.exposures
            ],
            indent=1,
        )
    )
    tmp_plan.replace(plan_path)
    return path
