"""Butler repositories that hold ldf's raw files (LDM-230 2.6.2.3.1, 5.1).

:class:`ButlerRepo` wraps an ``lsst.daf.butler`` repository the way the OODS and the Data
Backbone use it: create it (with the storage classes and formatter of ldf's raws declared in
its seed config, and both instruments registered), ingest raw files in place or by copy,
query, read and remove them. The result is an ordinary Butler repository: the ``butler`` and
``pipetask`` command-line tools see everything (dataset type ``raw`` in
``<instrument>/raw/all``, as Rubin names it).

Errors of daf_butler are turned into :mod:`ldf.errors` types at this boundary:

==================================================  ==========================================
daf_butler                                          ldf
==================================================  ==========================================
``ConflictingDefinitionError`` (different metadata)  ``UserInputError``
missing repository, collection, dataset, file        ``NotFoundError``
database unreachable (``sqlalchemy`` ``OperationalError``)  ``TransportError``
other I/O failure                                    ``StorageError``
read-only Butler asked to write                      ``StateError``
==================================================  ==========================================
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy.exc
from astropy.io import fits
from astropy.time import Time, TimeDelta
from lsst.daf.butler import (
    Butler,
    ButlerUserError,
    Config,
    DataCoordinate,
    DatasetIdGenEnum,
    DatasetRef,
    DatasetType,
    FileDataset,
    MissingCollectionError,
    MissingDatasetTypeError,
    Timespan,
)
from lsst.daf.butler.registry import ConflictingDefinitionError
from lsst.resources import ResourcePath

from ldf.butler.formatters import (
    RAW_STORAGE_CLASS,
    RawFitsFormatter,
    RawImage,
    formatter_config,
    storage_class_config,
)
from ldf.butler.instrument import INSTRUMENT_CLASSES, RAW_DIMENSIONS, instrument_class
from ldf.butler.records import RawRecord
from ldf.errors import (
    LdfError,
    NotFoundError,
    StateError,
    StorageError,
    TransportError,
    UserInputError,
)

__all__ = ["RAW_DATASET_TYPE", "ButlerRepo", "RawRecord", "default_raw_run", "seed_config"]

_LOG = logging.getLogger(__name__)

RAW_DATASET_TYPE = "raw"
"""Name of the raw dataset type, as in Rubin's repositories."""

DAY_OBS_OFFSET_HOURS = 12
"""Rubin's observing day rolls over at 12:00 TAI (day_obs is the date in UTC−12h)."""

UNKNOWN_BAND = "unknown"
"""Band of a physical filter registered at ingest without a band (e.g. a dark's 'unknown')."""

QUERY_FILTERS = {
    "day_obs": "exposure.day_obs = :q_day_obs",
    "exposure": "exposure = :q_exposure",
    "seq_num": "exposure.seq_num = :q_seq_num",
    "obs_id": "exposure.obs_id = :q_obs_id",
    "obs_type": "exposure.observation_type = :q_obs_type",
    "physical_filter": "physical_filter = :q_physical_filter",
    "band": "band = :q_band",
    "group": "exposure.group = :q_group",
}
"""Keyword of :meth:`ButlerRepo.query_raws` → its Butler query expression."""


def default_raw_run(instrument: str) -> str:
    """The run raws are ingested into by default: ``<instrument>/raw/all``."""
    return instrument_class(instrument)().makeDefaultRawIngestRunName()


def seed_config(db_url: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    """The seed configuration of a repository for ldf's raws.

    Parameters
    ----------
    db_url
        SQLAlchemy URL of the registry database; ``None`` is SQLite in the repository
        (``gen3.sqlite3``). Put passwords in ``~/.lsst/db-auth.yaml``, not in the URL: the
        URL is written to ``butler.yaml``.
    namespace
        PostgreSQL schema of the registry tables (``None``: the server's default).
    """
    config: dict[str, Any] = {
        "storageClasses": storage_class_config(),
        "datastore": {"formatters": formatter_config()},
    }
    if db_url is not None:
        config["registry"] = {"db": db_url}
        if namespace is not None:
            config["registry"]["namespace"] = namespace
    return config


@contextlib.contextmanager
def _boundary(action: str) -> Iterator[None]:
    """Turn daf_butler's (and the database's) exceptions into ldf errors, one line each."""
    try:
        yield
    except LdfError:
        raise
    except ConflictingDefinitionError as exc:
        raise UserInputError(
            f"{action}: conflicts with the repository: {_first_line(exc)}"
        ) from exc
    except (MissingCollectionError, MissingDatasetTypeError, FileNotFoundError) as exc:
        raise NotFoundError(f"{action}: {_first_line(exc)}") from exc
    except LookupError as exc:
        raise NotFoundError(f"{action}: {_first_line(exc)}") from exc
    except sqlalchemy.exc.OperationalError as exc:
        # The message of OperationalError holds the URL with no password; keep its first line.
        raise TransportError(f"{action}: database unreachable: {_first_line(exc.orig)}") from exc
    except ButlerUserError as exc:
        raise UserInputError(f"{action}: {_first_line(exc)}") from exc
    except TypeError as exc:
        if "read-only" in str(exc):
            raise StateError(f"{action}: the repository was opened read-only") from exc
        raise
    except OSError as exc:
        raise StorageError(f"{action}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _Exposure:
    """The dimension records one exposure needs, built from its first RawRecord."""

    day_obs: dict[str, Any]
    group: dict[str, Any]
    exposure: dict[str, Any]


@contextlib.contextmanager
def _creation_lock(root: ResourcePath) -> Iterator[None]:
    """An exclusive lock beside a local repository while it is created (no-op for URIs)."""
    if root.scheme not in ("file", ""):
        yield
        return
    import fcntl

    path = Path(root.ospath)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.create.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ButlerRepo:
    """An ``lsst.daf.butler`` repository holding ldf's raws.

    Use :meth:`create` or :meth:`open`, not the constructor. A ``ButlerRepo`` is a context
    manager that closes its Butler (and database connections) on exit.

    Parameters
    ----------
    butler
        The Butler of the repository.
    root
        Where the repository is (path or URI), for messages.
    """

    def __init__(self, butler: Butler, root: str) -> None:
        self._butler = butler
        self.root = root
        self._known_filters: set[tuple[str, str]] = set()
        self._raw_type_ok = False

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls, root: str | Path, *, db_url: str | None = None, namespace: str | None = None
    ) -> ButlerRepo:
        """Create the repository, or open it if it exists (idempotent), and register both
        instruments (their detectors and filters) and the ``raw`` dataset type.

        Parameters
        ----------
        root
            Directory (or URI) of the repository; created if missing.
        db_url
            Registry database URL (``postgresql+psycopg://user@host:port/db``); ``None`` is
            SQLite inside ``root``. PostgreSQL needs the ``btree_gist`` extension.
        namespace
            PostgreSQL schema for the registry tables.

        Raises
        ------
        TransportError
            The registry database cannot be reached.
        UserInputError
            The repository exists with a conflicting definition (e.g. ``raw`` stored as
            obs_base's ``Exposure``).
        """
        root_uri = ResourcePath(str(root), forceDirectory=True)
        config_uri = root_uri.join("butler.yaml")
        # makeRepo writes butler.yaml before it creates the registry tables: a second creator
        # (another thread or process) that saw the file would open a half-made registry
        # (MissingManagerError). Creators of a local repository take a file lock.
        with _creation_lock(root_uri), _boundary(f"cannot create Butler repository {root}"):
            if not config_uri.exists():
                with contextlib.suppress(FileExistsError):
                    Butler.makeRepo(root_uri, config=Config(seed_config(db_url, namespace)))
        repo = cls.open(root, writeable=True)
        try:
            with _boundary(f"cannot register instruments in {root}"):
                for inst_cls in INSTRUMENT_CLASSES.values():
                    inst_cls().register(repo._butler.registry)
                repo._ensure_raw_type()
        except BaseException:
            repo.close()
            raise
        return repo

    @classmethod
    def open(cls, root: str | Path, *, writeable: bool = True) -> ButlerRepo:
        """Open an existing repository.

        Raises
        ------
        NotFoundError
            There is no repository at ``root``.
        TransportError
            Its registry database cannot be reached.
        """
        root_uri = ResourcePath(str(root), forceDirectory=True)
        if not root_uri.join("butler.yaml").exists():
            raise NotFoundError(f"no Butler repository at {root} (create it first)")
        with _boundary(f"cannot open Butler repository {root}"):
            butler = Butler.from_config(str(root), writeable=writeable)
        return cls(butler, str(root))

    @property
    def butler(self) -> Butler:
        """The underlying Butler, for what this class does not wrap."""
        return self._butler

    def close(self) -> None:
        """Release the Butler's database connections."""
        self._butler.close()

    def __enter__(self) -> ButlerRepo:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- ingest

    def ingest_raws(
        self,
        records: Sequence[RawRecord],
        *,
        transfer: str = "direct",
        run: str | None = None,
        update_records: bool = False,
    ) -> list[DatasetRef]:
        """Register raw files: their dimension records, then the files themselves.

        Idempotent: a file whose dataset (same instrument, exposure, detector, run) is
        already in the repository is skipped, not an error. Dataset ids are derived from the
        data ID and run, so every site that ingests the same raw gets the same id.

        Parameters
        ----------
        records
            One per file; several instruments may be mixed.
        transfer
            'direct' (register the file where it is; never moved or deleted by the
            repository), 'copy', 'move', 'hardlink', 'symlink', 'relsymlink', 'auto'.
        run
            RUN collection; default ``<instrument>/raw/all``.
        update_records
            Replace exposure records whose metadata differ (else that is an error).

        Returns
        -------
        list[DatasetRef]
            The refs of all ``records``, in order (new and already present).

        Raises
        ------
        UserInputError
            Unknown instrument or detector, two files for one data ID, or metadata that
            conflicts with what the repository holds.
        NotFoundError
            A file does not exist.
        StateError
            The repository was opened read-only.
        """
        if not records:
            return []
        self._check_unique(records)
        by_instrument: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            by_instrument.setdefault(rec.instrument, []).append(i)
        refs: list[DatasetRef | None] = [None] * len(records)
        for instrument, indexes in by_instrument.items():
            inst_run = run or default_raw_run(instrument)
            batch = [records[i] for i in indexes]
            new_refs = self._ingest_instrument(
                instrument, batch, transfer, inst_run, update_records
            )
            for i, ref in zip(indexes, new_refs, strict=True):
                refs[i] = ref
        return [r for r in refs if r is not None]

    def _ingest_instrument(
        self,
        instrument: str,
        records: list[RawRecord],
        transfer: str,
        run: str,
        update: bool,
    ) -> list[DatasetRef]:
        cam = instrument_class(instrument).camera()
        det_ids = {d.name: d.id for d in cam.detectors}
        for rec in records:
            if rec.detector not in det_ids:
                raise UserInputError(f"{rec.path}: {instrument} has no detector {rec.detector!r}")
        action = f"cannot ingest {len(records)} {instrument} raw file(s) into {run}"
        with _boundary(action):
            self._ensure_raw_type()
            registry = self._butler.registry
            registry.registerRun(run)
            dataset_type = registry.getDatasetType(RAW_DATASET_TYPE)
            exposures: dict[int, _Exposure] = {}
            for rec in records:
                if rec.exposure_id not in exposures:
                    exposures[rec.exposure_id] = self._exposure_records(rec)
            with self._butler.transaction():
                for rec in records:
                    self._ensure_filter(rec)
                for exp in exposures.values():
                    registry.syncDimensionData("day_obs", exp.day_obs)
                    registry.syncDimensionData("group", exp.group)
                    registry.syncDimensionData("exposure", exp.exposure, update=update)
            datasets = []
            refs = []
            universe = self._butler.dimensions
            for rec in records:
                data_id = DataCoordinate.standardize(
                    instrument=instrument,
                    exposure=rec.exposure_id,
                    detector=det_ids[rec.detector],
                    universe=universe,
                )
                ref = DatasetRef(
                    dataset_type,
                    data_id,
                    run=run,
                    id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN,
                )
                refs.append(ref)
                datasets.append(
                    FileDataset(path=ResourcePath(rec.path), refs=[ref], formatter=RawFitsFormatter)
                )
            self._butler.ingest(*datasets, transfer=transfer, skip_existing=True)
        return refs

    @staticmethod
    def _check_unique(records: Sequence[RawRecord]) -> None:
        seen: dict[tuple[str, int, str], str] = {}
        for rec in records:
            key = (rec.instrument, rec.exposure_id, rec.detector)
            other = seen.setdefault(key, rec.path)
            if other != rec.path:
                raise UserInputError(
                    f"two files for {rec.instrument} exposure {rec.exposure_id} detector "
                    f"{rec.detector}: {other} and {rec.path}"
                )

    def _ensure_raw_type(self) -> None:
        if self._raw_type_ok:
            return
        dataset_type = DatasetType(
            RAW_DATASET_TYPE,
            dimensions=RAW_DIMENSIONS,
            storageClass=RAW_STORAGE_CLASS,
            universe=self._butler.dimensions,
        )
        try:
            existing = self._butler.registry.getDatasetType(RAW_DATASET_TYPE)
        except MissingDatasetTypeError:
            self._butler.registry.registerDatasetType(dataset_type)
        else:
            if existing != dataset_type:
                raise UserInputError(
                    f"repository {self.root} already defines dataset type 'raw' as "
                    f"{existing.storageClass_name} over {existing.dimensions}; ldf needs "
                    f"{RAW_STORAGE_CLASS} over {dataset_type.dimensions}"
                )
        self._raw_type_ok = True

    def _ensure_filter(self, rec: RawRecord) -> None:
        """Register a physical filter the instrument class does not know (e.g. 'unknown')."""
        key = (rec.instrument, rec.physical_filter)
        if key in self._known_filters:
            return
        known = instrument_class(rec.instrument).physical_filters()
        # The band column is NOT NULL on PostgreSQL; obs_lsst also files filterless
        # exposures under band 'unknown'.
        band = known.get(rec.physical_filter) or rec.band or UNKNOWN_BAND
        self._butler.registry.syncDimensionData(
            "physical_filter",
            {"instrument": rec.instrument, "name": rec.physical_filter, "band": band},
        )
        self._known_filters.add(key)

    def _exposure_records(self, rec: RawRecord) -> _Exposure:
        day = Time(
            f"{rec.day_obs // 10000:04d}-{rec.day_obs // 100 % 100:02d}-{rec.day_obs % 100:02d}"
            f"T{DAY_OBS_OFFSET_HOURS:02d}:00:00",
            format="isot",
            scale="tai",
        )
        begin = Time(rec.start_tai_mjd, format="mjd", scale="tai")
        end = Time(rec.end_tai_mjd, format="mjd", scale="tai")
        if end <= begin:
            # An empty timespan would never overlap a calibration's validity range
            # (obs_base clamps the same way, to the begin time).
            end = begin + TimeDelta(0.001, format="sec")
        exposure = {
            "instrument": rec.instrument,
            "id": rec.exposure_id,
            "obs_id": rec.obs_id,
            "physical_filter": rec.physical_filter,
            "group": rec.group,
            "day_obs": rec.day_obs,
            "exposure_time": float(rec.exp_time_s),
            "dark_time": float(rec.dark_time_s),
            "observation_type": rec.obs_type,
            "observation_reason": rec.observation_reason or "unknown",
            "seq_num": rec.seq_num,
            "seq_start": rec.seq_num,
            "seq_end": rec.seq_num,
            "target_name": rec.target_name or "UNKNOWN",
            "science_program": rec.science_program or "unknown",
            "tracking_ra": rec.ra_deg,
            "tracking_dec": rec.dec_deg,
            "sky_angle": rec.rot_sky_deg,
            "azimuth": rec.az_deg,
            "zenith_angle": rec.zenith_angle_deg,
            "has_simulated": rec.has_simulated,
            "can_see_sky": rec.can_see_sky,
            "timespan": Timespan(begin, end),
        }
        return _Exposure(
            day_obs={
                "instrument": rec.instrument,
                "id": rec.day_obs,
                "timespan": Timespan(day, day + TimeDelta(1.0, format="jd")),
            },
            group={"instrument": rec.instrument, "name": rec.group},
            exposure=exposure,
        )

    # ---------------------------------------------------------------- queries

    def query_raws(
        self,
        instrument: str,
        *,
        collections: str | Iterable[str] | None = None,
        with_paths: bool = False,
        **where: Any,
    ) -> list[dict[str, Any]]:
        """The raws of ``instrument`` matching every given filter, ordered by exposure, detector.

        Parameters
        ----------
        instrument
            'LSSTCam' or 'LATISS'.
        collections
            Collections to search; default ``<instrument>/raw/all``.
        with_paths
            Add each file's location (``path``: local path or URI); one datastore lookup
            per dataset.
        **where
            Filters (values are matched exactly): ``day_obs``, ``exposure`` (id),
            ``seq_num``, ``obs_id``, ``obs_type``, ``physical_filter``, ``band``, ``group``,
            ``detector`` (a name or id, or a list of them).

        Returns
        -------
        list[dict]
            One dict per dataset: ``instrument``, ``exposure``, ``detector`` (name),
            ``detector_id``, ``day_obs``, ``seq_num``, ``obs_id``, ``obs_type``,
            ``physical_filter``, ``band``, ``group``, ``exp_time_s``, ``run``,
            ``dataset_id`` (and ``path``).

        Raises
        ------
        UserInputError
            Unknown instrument or filter keyword.
        """
        refs = self._query_refs(instrument, collections, where)
        rows = []
        for ref in refs:
            records = ref.dataId.records
            exp = records["exposure"]
            det = records["detector"]
            # Both are present: the query asked for with_dimension_records=True.
            assert exp is not None
            assert det is not None
            row: dict[str, Any] = {
                "instrument": instrument,
                "exposure": exp.id,
                "detector": det.full_name,
                "detector_id": det.id,
                "day_obs": exp.day_obs,
                "seq_num": exp.seq_num,
                "obs_id": exp.obs_id,
                "obs_type": exp.observation_type,
                "physical_filter": exp.physical_filter,
                "band": ref.dataId.get("band"),
                "group": exp.group,
                "exp_time_s": exp.exposure_time,
                "run": ref.run,
                "dataset_id": ref.id,
            }
            if with_paths:
                with _boundary(f"cannot locate {ref}"):
                    uri = self._butler.getURI(ref)
                row["path"] = uri.ospath if uri.isLocal else str(uri)
            rows.append(row)
        return rows

    def _query_refs(
        self, instrument: str, collections: str | Iterable[str] | None, filters: dict[str, Any]
    ) -> list[DatasetRef]:
        cam = instrument_class(instrument).camera()
        if collections is None:
            collections = default_raw_run(instrument)
        clauses = []
        bind: dict[str, Any] = {}
        for key, value in filters.items():
            if value is None:
                continue
            if key == "detector":
                values = [value] if isinstance(value, str | int) else list(value)
                ids = [v if isinstance(v, int) else cam.detector(v).id for v in values]
                clauses.append("detector IN (:q_detector)")
                bind["q_detector"] = ids
            elif key in QUERY_FILTERS:
                clauses.append(QUERY_FILTERS[key])
                bind[f"q_{key}"] = value
            else:
                raise UserInputError(
                    f"unknown raw filter {key!r}; use one of "
                    f"{', '.join(sorted([*QUERY_FILTERS, 'detector']))}"
                )
        with _boundary(f"cannot query {instrument} raws"):
            try:
                return self._butler.query_datasets(
                    RAW_DATASET_TYPE,
                    collections=collections,
                    where=" AND ".join(clauses),
                    bind=bind,
                    instrument=instrument,
                    with_dimension_records=True,
                    order_by=["exposure", "detector"],
                    limit=None,
                    explain=False,
                )
            except (MissingCollectionError, MissingDatasetTypeError):
                return []  # nothing ingested yet

    def get_raw(
        self,
        instrument: str,
        exposure_id: int,
        detector: str | int,
        *,
        collections: str | Iterable[str] | None = None,
        amplifiers: Iterable[str] | None = None,
    ) -> RawImage:
        """Read one raw through ``butler.get``.

        Parameters
        ----------
        instrument, exposure_id, detector
            Data ID; ``detector`` by name ('R22_S11') or id.
        collections
            Default ``<instrument>/raw/all``.
        amplifiers
            Read only these amplifiers (names).

        Raises
        ------
        NotFoundError
            No such raw.
        """
        det_id = self._detector_id(instrument, detector)
        params = {"amplifiers": list(amplifiers)} if amplifiers is not None else None
        with _boundary(f"cannot read {instrument} raw {exposure_id} {detector}"):
            return self._butler.get(
                RAW_DATASET_TYPE,
                instrument=instrument,
                exposure=exposure_id,
                detector=det_id,
                collections=collections or default_raw_run(instrument),
                parameters=params,
            )

    def get_raw_header(
        self,
        instrument: str,
        exposure_id: int,
        detector: str | int,
        *,
        collections: str | Iterable[str] | None = None,
    ) -> fits.Header:
        """The primary header of one raw (the ``raw.metadata`` component; no pixels read).

        Raises
        ------
        NotFoundError
            No such raw.
        """
        det_id = self._detector_id(instrument, detector)
        with _boundary(f"cannot read {instrument} raw header {exposure_id} {detector}"):
            return self._butler.get(
                f"{RAW_DATASET_TYPE}.metadata",
                instrument=instrument,
                exposure=exposure_id,
                detector=det_id,
                collections=collections or default_raw_run(instrument),
            )

    @staticmethod
    def _detector_id(instrument: str, detector: str | int) -> int:
        if isinstance(detector, int):
            return detector
        return instrument_class(instrument).camera().detector(detector).id

    # ---------------------------------------------------------------- removal

    def remove_raws(
        self,
        instrument: str,
        exposure_id: int,
        detectors: Iterable[str | int] | None = None,
        *,
        collections: str | Iterable[str] | None = None,
    ) -> int:
        """Remove raws of one exposure from the registry and datastore.

        Files ingested with ``transfer='direct'`` (outside the datastore root) stay on disk;
        files the datastore owns (copied, moved, linked into it) are deleted. Dimension
        records (exposure, day_obs, group) stay, as daf_butler cannot delete them.

        Parameters
        ----------
        instrument, exposure_id
            The exposure.
        detectors
            Only these detectors (names or ids); ``None`` removes all of them.
        collections
            Where to look; default ``<instrument>/raw/all``.

        Returns
        -------
        int
            Number of datasets removed (0 when there was nothing to remove).

        Raises
        ------
        StateError
            The repository was opened read-only.
        """
        filters: dict[str, Any] = {"exposure": exposure_id}
        if detectors is not None:
            filters["detector"] = list(detectors)
            if not filters["detector"]:
                return 0
        refs = self._query_refs(instrument, collections, filters)
        if not refs:
            return 0
        with _boundary(f"cannot remove {instrument} raws of exposure {exposure_id}"):
            self._butler.pruneDatasets(refs, disassociate=True, unstore=True, purge=True)
        _LOG.info("removed %d %s raw(s) of exposure %d", len(refs), instrument, exposure_id)
        return len(refs)
