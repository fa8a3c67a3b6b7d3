"""Benchmark: the Data Backbone's ingest, checksums, replication and audit, each against a peer.

Four figures, each with its comparison measured in the same run on the same files:

1. **Ingest with Butler registration** (files/s): ``Backbone.ingest`` of small raw FITS files
   (policy ``butler=True``: checksum, verified and fsynced copy into the base site, catalog
   row, registration in the base site's Butler). Baseline: plain Butler ingest of the same
   files in place (``RawRecord.from_file`` + one ``ButlerRepo.ingest_raws(transfer='direct')``
   call), into a fresh repository created the same way. Also reported: the same with one
   ``ingest_raws`` call per file, the Backbone's call pattern (it registers as files arrive).
2. **Checksums** (MB/s): ``checksum_file`` (Adler-32 and BLAKE3 in one pass) against the
   ``md5sum`` and ``b3sum`` tools on the same big files. Page cache cannot be dropped here, so
   every file is read once before any timing: all tools see a warm cache.
3. **Replication** (MB/s): ``Backbone.run_transfers`` copying those files base→archive (rule
   ``copies=1, sites=['archive']``: streamed, checksummed, fsynced, read back and verified)
   against ``cp`` of the same files to another directory (also reported: ``cp`` + fsync).
4. **Audit** (files/s): ``integrity.audit`` (sizes mode) of a site holding ``--audit-files``
   catalogued tiny files, against a plain ``os.walk`` + ``os.stat`` of the same tree — what any
   audit must at least do. Setup shortcut: the files are written with ``os`` straight into the
   endpoint's directory and their catalog rows (SQLFile, SQLReplica) are inserted in bulk with
   SQLAlchemy core on the catalog's engine, not through ``Backbone.ingest`` (which would take
   far longer than the audit being measured). The rows are exactly what ingest would write.

Requirement it answers: the Data Backbone (LDM-230 5.1) must archive and replicate each
exposure's files while the camera takes the next one (205 files every ~34–39 s, LDM-230
2.2.2.2) and must audit its catalog against storage at a cadence the daemon can afford.

The catalog is SQLite (the embedded default) unless ``--postgres URL`` names a PostgreSQL
server: the benchmark then creates a scratch database on it (through the database of URL) and
drops it at the end. Butler registries stay SQLite. Progress goes to stderr; the result is one
JSON object on stdout.

Usage: python benchmarks/backbone.py [--files N] [--checksum-files K] [--checksum-mb MB]
       [--audit-files N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from ldf.backbone.butler import repo_for
from ldf.backbone.checksums import checksum_bytes, checksum_file
from ldf.backbone.integrity import audit
from ldf.backbone.models import FileState, ReplicaState, Retention, Rule
from ldf.backbone.schema import SQLFile, SQLReplica
from ldf.backbone.service import Backbone
from ldf.butler import ButlerRepo, RawImage, RawRecord
from ldf.config import Tier, load_settings
from ldf.db import utcnow
from ldf.sim.instruments import get_instrument
from ldf.sim.models import obs_id

DAY_OBS = 20261121
EXPOSURE_S = 34.0
"""Shortest interval between exposures (LDM-230 2.2.2.2)."""
FILES_PER_EXPOSURE = 205
"""LSSTCam files per exposure (189 science, 8 wavefront, 8 guider sensors)."""


def log(message: str) -> None:
    print(f"[backbone bench] {message}", file=sys.stderr, flush=True)


def rate(n: float, seconds: float, digits: int = 1) -> float | None:
    return round(n / seconds, digits) if seconds > 0 else None


# -- 1. ingest with Butler registration ----------------------------------------------------


def raw_header(seq_num: int, detector: str) -> fits.Header:
    """A primary header with the keywords LSSTCam writes (as in tests/butler/rawfiles.py)."""
    raft, sensor = detector.split("_")
    start = 61365.1 + seq_num * 0.0005
    header = fits.Header()
    header.update(
        {
            "INSTRUME": "LSSTCam",
            "OBSID": obs_id("LSSTCam", DAY_OBS, seq_num),
            "DAYOBS": str(DAY_OBS),
            "SEQNUM": seq_num,
            "IMGTYPE": "science",
            "EXPTIME": 30.0,
            "DARKTIME": 30.9,
            "FILTER": "r_57",
            "FILTBAND": "r",
            "MJD-BEG": start,
            "MJD-END": start + 30.9 / 86400,
            "RA": 150.1,
            "DEC": -30.2,
            "ROTPA": 12.0,
            "AZSTART": 180.0,
            "ELSTART": 70.0,
            "AMSTART": 1.064,
            "RAFTBAY": raft,
            "CCDSLOT": sensor,
            "GROUPID": f"{DAY_OBS}-pair-{(seq_num + 1) // 2}",
            "PROGRAM": "BLOCK-365",
            "REASON": "wfd",
            "OBJECT": "field_42",
            "SIMULATE": True,
        }
    )
    return header


def write_raws(directory: Path, n: int) -> list[tuple[Path, int, str]]:
    """Write ``n`` tiny raw MEF files (4 amplifiers of 6×8 pixels): (path, seq_num, detector)."""
    directory.mkdir(parents=True, exist_ok=True)
    detectors = [d.name for d in get_instrument("LSSTCam").science_detectors()]
    out = []
    for i in range(n):
        seq, det = i // len(detectors) + 1, detectors[i % len(detectors)]
        raw = RawImage(metadata=raw_header(seq, det))
        for a, amp in enumerate(("C10", "C11", "C12", "C13")):
            raw.amplifiers[amp] = np.arange(48, dtype=np.int32).reshape(6, 8) + i * 100 + a
        path = directory / f"{obs_id('LSSTCam', DAY_OBS, seq)}_{det}.fits"
        raw.writeto(path, overwrite=True)
        out.append((path, seq, det))
    return out


def bench_ingest(bb: Backbone, tmp: Path, n: int) -> dict[str, Any]:
    log(f"ingest: writing {n} raw FITS files")
    raws = write_raws(tmp / "raws", n)
    nbytes = sum(p.stat().st_size for p, _, _ in raws)
    # Both repositories are created before timing: the figure is ingest, not repo creation.
    repo_for(bb, "base")
    plain = ButlerRepo.create(tmp / "plain-butler")
    single = ButlerRepo.create(tmp / "plain-butler-per-file")
    try:
        log(f"ingest: Backbone.ingest of {n} files (butler=True)")
        t0 = time.perf_counter()
        registered = 0
        for path, seq, det in raws:
            oid = obs_id("LSSTCam", DAY_OBS, seq)
            result = bb.ingest(
                path,
                f"raw/LSSTCam/{DAY_OBS}/{oid}/{path.name}",
                site="base",
                metadata={
                    "dataset_type": "raw",
                    "instrument": "LSSTCam",
                    "day_obs": DAY_OBS,
                    "exposure": DAY_OBS * 100000 + seq,
                    "detector": det,
                },
                producer="bench",
            )
            registered += result.butler
        bb_s = time.perf_counter() - t0
        if registered != n:
            raise RuntimeError(f"only {registered}/{n} files were registered in the Butler")
        log("ingest: plain Butler ingest_raws(transfer='direct') of the same files")
        t0 = time.perf_counter()
        records = [RawRecord.from_file(p) for p, _, _ in raws]
        hdr_s = time.perf_counter() - t0
        refs = plain.ingest_raws(records, transfer="direct")
        plain_s = time.perf_counter() - t0
        if len(refs) != n:
            raise RuntimeError(f"plain Butler ingest returned {len(refs)} refs for {n} files")
        log("ingest: plain Butler again, one ingest_raws call per file (as the Backbone does)")
        t0 = time.perf_counter()
        for p, _, _ in raws:
            single.ingest_raws([RawRecord.from_file(p)], transfer="direct")
        single_s = time.perf_counter() - t0
    finally:
        plain.close()
        single.close()
    return {
        "files": n,
        "bytes_per_file": round(nbytes / n),
        "figure": {
            "what": "Backbone.ingest one file at a time: checksum, verified fsynced copy to "
            "base/disk, catalog row, Butler registration (butler=True)",
            "files_per_s": rate(n, bb_s),
            "seconds": round(bb_s, 3),
            "needed_files_per_s": round(FILES_PER_EXPOSURE / EXPOSURE_S, 1),
        },
        "baseline": {
            "what": "plain Butler: RawRecord.from_file of each file + one "
            "ingest_raws(records, transfer='direct') into a fresh repository, same run",
            "files_per_s": rate(n, plain_s),
            "seconds": round(plain_s, 3),
            "header_read_seconds": round(hdr_s, 3),
        },
        "ratio": round(bb_s / plain_s, 2),
        "ratio_meaning": "Backbone ingest time / plain Butler ingest time (lower is better)",
        "baseline_one_call_per_file": {
            "what": "plain Butler, RawRecord.from_file + ingest_raws([record]) per file (the "
            "call pattern of the Backbone's registration), fresh repository, same run",
            "files_per_s": rate(n, single_s),
            "seconds": round(single_s, 3),
        },
        "ratio_vs_one_call_per_file": round(bb_s / single_s, 2),
    }


# -- 2. checksums and 3. replication -------------------------------------------------------


def write_big(path: Path, mb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = 8 << 20
    left = mb << 20
    with open(path, "wb") as f:
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n


def read_once(paths: list[Path]) -> None:
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def time_tool(tool: str, argv: list[str], nbytes: int) -> dict[str, Any]:
    exe = shutil.which(tool)
    if exe is None:
        return {"MB_per_s": None, "note": f"{tool} not on PATH"}
    t0 = time.perf_counter()
    subprocess.run([exe, *argv], check=True, stdout=subprocess.DEVNULL)
    s = time.perf_counter() - t0
    return {"MB_per_s": rate(nbytes / 1e6, s), "seconds": round(s, 3)}


def bench_big(bb: Backbone, tmp: Path, k: int, mb: int) -> tuple[dict[str, Any], dict[str, Any]]:
    src = tmp / "big-src"
    src.mkdir()
    log(f"checksum/replication: writing {k} files of {mb} MB")
    paths = []
    for i in range(k):
        p = src / f"big-{i:02d}.bin"
        write_big(p, mb, seed=i)
        paths.append(p)
    nbytes = sum(p.stat().st_size for p in paths)
    bb.add_rule(
        Rule(name="bench-big", expression="dataset_type == 'bench'", copies=1, sites=["archive"])
    )
    log("replication: ingesting them into base (queues transfers to archive)")
    read_once(paths)
    t0 = time.perf_counter()
    lfns = []
    for p in paths:
        lfn = f"bench/big/{p.name}"
        res = bb.ingest(p, lfn, site="base", metadata={"dataset_type": "bench"})
        if res.transfers_queued != 1:
            raise RuntimeError(f"{lfn}: {res.transfers_queued} transfers queued, expected 1")
        lfns.append(lfn)
    ingest_s = time.perf_counter() - t0
    shutil.rmtree(src)  # the base replicas are the files from now on
    base = bb.endpoint("base", "disk")
    files = [base.root / lfn for lfn in lfns]  # type: ignore[attr-defined]

    log("checksum: warm read, then checksum_file, md5sum, b3sum")
    read_once(files)
    t0 = time.perf_counter()
    for f in files:
        checksum_file(f)
    ours_s = time.perf_counter() - t0
    argv = [str(f) for f in files]
    md5 = time_tool("md5sum", argv, nbytes)
    b3 = time_tool("b3sum", argv, nbytes)
    b3_1 = time_tool("b3sum", ["--num-threads", "1", *argv], nbytes)
    ours = nbytes / 1e6 / ours_s
    checksum = {
        "files": k,
        "MB_per_file": mb,
        "cache": "warm: every file read once before timing (page cache cannot be dropped "
        "here); all tools see the same warm cache",
        "figure": {
            "what": "checksum_file: size + Adler-32 + BLAKE3 in one pass (8 MiB reads, "
            "Adler-32 on a helper thread)",
            "MB_per_s": round(ours, 1),
            "seconds": round(ours_s, 3),
        },
        "baseline": {
            "md5sum": md5,
            "b3sum": {**b3, "threads": "default (all cores, memory-mapped)"},
            "b3sum_1_thread": b3_1,
        },
        "ratio": {
            name: (round(ours / r["MB_per_s"], 2) if r.get("MB_per_s") else None)
            for name, r in (("vs_md5sum", md5), ("vs_b3sum", b3), ("vs_b3sum_1_thread", b3_1))
        },
        "ratio_meaning": "checksum_file MB/s / tool MB/s (higher is better)",
    }

    log("replication: run_transfers base→archive, then cp of the same files")
    t0 = time.perf_counter()
    report = bb.run_transfers()
    repl_s = time.perf_counter() - t0
    if report.done != k or report.failed or report.retried:
        raise RuntimeError(f"run_transfers: {report.as_dict()}")
    dest = tmp / "cp-dest"
    dest.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["cp", *argv, str(dest)], check=True)
    cp_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for f in dest.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    cp_sync_s = cp_s + time.perf_counter() - t1
    replication = {
        "files": k,
        "MB_per_file": mb,
        "figure": {
            "what": "Backbone.run_transfers base/disk → archive/disk (rule copies=1, "
            "sites=['archive']): streamed, checksummed, fsynced, read back and verified",
            "MB_per_s": rate(nbytes / 1e6, repl_s),
            "seconds": round(repl_s, 3),
            "workers": bb.policy.transfer_workers,
        },
        "baseline": {
            "what": "cp of the same files to another directory of the same filesystem, "
            "same run, warm source cache",
            "MB_per_s": rate(nbytes / 1e6, cp_s),
            "seconds": round(cp_s, 3),
            "cp_then_fsync_MB_per_s": rate(nbytes / 1e6, cp_sync_s),
        },
        "ratio": round(repl_s / cp_s, 2),
        "ratio_vs_cp_then_fsync": round(repl_s / cp_sync_s, 2),
        "ratio_meaning": "run_transfers time / cp time (lower is better)",
        "setup_ingest_MB_per_s": rate(nbytes / 1e6, ingest_s),
    }
    return checksum, replication


# -- 4. audit ------------------------------------------------------------------------------


def populate_audit(bb: Backbone, site: str, n: int, batch: int = 10_000) -> int:
    """Write ``n`` 16-byte files into the site's disk endpoint and catalogue them in bulk."""
    ep = bb.endpoint(site, "disk")
    root: Path = ep.root  # type: ignore[attr-defined]
    now = utcnow()
    engine = bb.store.engine
    total = 0
    for start in range(0, n, batch):
        files: list[dict[str, Any]] = []
        lfns: list[str] = []
        for i in range(start, min(n, start + batch)):
            lfn = f"bench/audit/{i // 1000:04d}/f{i:08d}.dat"
            data = f"{i:015d}\n".encode()
            path = root / lfn
            if i % 1000 == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            sums = checksum_bytes(data)
            total += sums.size
            lfns.append(lfn)
            files.append(
                {
                    "lfn": lfn,
                    "size": sums.size,
                    "adler32": sums.adler32,
                    "blake3": sums.blake3,
                    "meta": {"dataset_type": "bench-audit"},
                    "producer": "bench",
                    "inputs": [],
                    "retention": Retention.PERMANENT.value,
                    "expires_at": None,
                    "state": FileState.ACTIVE.value,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        with engine.begin() as conn:
            conn.execute(insert(SQLFile), files)
            ids = dict(
                conn.execute(select(SQLFile.lfn, SQLFile.id).where(SQLFile.lfn.in_(lfns))).all()
            )
            conn.execute(
                insert(SQLReplica),
                [
                    {
                        "file_id": ids[lfn],
                        "site": site,
                        "endpoint": ep.name,
                        "tier": Tier.DISK.value,
                        "uri": ep.uri(lfn),
                        "state": ReplicaState.AVAILABLE.value,
                        "created_at": now,
                        "updated_at": now,
                        "verified_at": now,
                    }
                    for lfn in lfns
                ],
            )
        log(f"audit: populated {min(n, start + batch)}/{n}")
    return total


def bench_audit(bb: Backbone, n: int) -> dict[str, Any]:
    site = "summit"  # a site nothing else in this benchmark writes to
    t0 = time.perf_counter()
    populate_audit(bb, site, n)
    setup_s = time.perf_counter() - t0
    log(f"audit: integrity.audit of {n} files at {site} (sizes mode)")
    t0 = time.perf_counter()
    report = audit(bb, site)
    audit_s = time.perf_counter() - t0
    if report.checked != n or report.lost or report.corrupt or report.dark:
        raise RuntimeError(
            f"audit: checked {report.checked}/{n}, lost {report.lost}, corrupt "
            f"{report.corrupt}, dark {report.dark}"
        )
    log("audit: os.walk + os.stat of the same tree")
    root = bb.endpoint(site, "disk").root  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    seen = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            # The plainest walk on purpose: os calls, no pathlib objects.
            os.stat(os.path.join(dirpath, name))  # noqa: PTH116, PTH118
            seen += 1
    walk_s = time.perf_counter() - t0
    if seen != n:
        raise RuntimeError(f"os.walk saw {seen} files, expected {n}")
    return {
        "files": n,
        "bytes_per_file": 16,
        "setup": "files written with os into the endpoint directory; catalog rows inserted "
        "in bulk with SQLAlchemy core (SQLFile, SQLReplica) — not timed as ingest",
        "setup_seconds": round(setup_s, 1),
        "figure": {
            "what": "integrity.audit(bb, site), sizes mode: walk the endpoint, stream the "
            "site's replicas from the catalog, compare sizes, save the report",
            "files_per_s": rate(n, audit_s, 0),
            "seconds": round(audit_s, 3),
        },
        "baseline": {
            "what": "os.walk + os.stat of every file of the same tree, same run",
            "files_per_s": rate(n, walk_s, 0),
            "seconds": round(walk_s, 3),
        },
        "ratio": round(audit_s / walk_s, 2),
        "ratio_meaning": "audit time / walk+stat time (lower is better)",
    }


# -- driver --------------------------------------------------------------------------------


@contextmanager
def scratch_postgres(server_url: str) -> Iterator[str]:
    """A new database on the server of ``server_url``, dropped afterwards (its URL)."""
    url = make_url(server_url)
    name = f"ldf_bench_{secrets.token_hex(6)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def catalog(tmp: Path, postgres: str | None) -> Iterator[str]:
    if postgres is None:
        yield f"sqlite:///{tmp / 'catalog.sqlite3'}"
    else:
        with scratch_postgres(postgres) as url:
            yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500, help="Raw files ingested (figure 1).")
    parser.add_argument(
        "--checksum-files", type=int, default=4, help="Big files (figures 2 and 3)."
    )
    parser.add_argument("--checksum-mb", type=int, default=256, help="Size of each big file.")
    parser.add_argument(
        "--audit-files", type=int, default=100_000, help="Catalogued files audited (figure 4)."
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="Catalog on this PostgreSQL server (a scratch database is created and dropped), "
        "e.g. postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres",
    )
    args = parser.parse_args()
    for name in ("files", "checksum_files", "checksum_mb", "audit_files"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    # A killed run (SIGTERM, e.g. a timeout) still removes its temp dir and scratch database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ldf-bench-backbone-"))
    try:
        with catalog(tmp, args.postgres) as url:
            settings = load_settings(
                home=tmp / "home",
                databases={"catalog": url},
                policies={"backbone": {"butler": True}},
            )
            bb = Backbone.open(settings)
            try:
                ingest = bench_ingest(bb, tmp, args.files)
                checksum, replication = bench_big(bb, tmp, args.checksum_files, args.checksum_mb)
                audit_result = bench_audit(bb, args.audit_files)
            finally:
                for repo in bb._butlers.values():
                    repo.close()
                bb.close()
            engine = make_url(url).get_backend_name()
        print(
            json.dumps(
                {
                    "benchmark": "backbone",
                    "requirement": "archive and replicate each exposure's files while the next "
                    "is taken (205 files every ~34-39 s, LDM-230 2.2.2.2) and audit the "
                    "catalog against storage (Data Backbone, LDM-230 5.1)",
                    "catalog": engine,
                    "ingest": ingest,
                    "checksum": checksum,
                    "replication": replication,
                    "audit": audit_result,
                    "filesystem": "one local filesystem for every site (temp dir)",
                    "cores": len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity")
                    else os.cpu_count(),
                    "total_seconds": round(time.perf_counter() - started, 1),
                    "python": sys.version.split()[0],
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
