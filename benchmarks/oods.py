"""Benchmark: OODS HTTP downloads (MB/s) and searches (requests/s) against static serving.

The OODS app (`ldf.oods.handlers.create_app`) is served by uvicorn on 127.0.0.1; a client in
this process (httpx, one keep-alive connection, sequential requests) measures:

1. **Download** (MB/s): GET of one cached raw of ``--mb`` MB (a real FITS file added through
   `Oods.add`, so registered in the OODS Butler), ``--downloads`` times, with bearer-token
   check, index lookup, path containment check and a read lease per request. Baselines in the
   same run, same file, same client: Python's ``http.server`` (``ThreadingHTTPServer``,
   HTTP/1.1 keep-alive, in a thread) and starlette's ``StaticFiles`` under the same uvicorn.
2. **Search** (requests/s): ``GET /files?exposure=…&detector=…`` (one match) over an index
   of ``--entries`` files, ``--searches`` times. Baselines: the same two static servers
   serving the JSON body of one such answer as a file — what any HTTP request costs before
   any search is done. Setup shortcut: the index rows of the search figure are written with
   `IndexStore.upsert` (what `Oods.add` writes after the Butler registration), not through
   `Oods.add`, which would register thousands of files in the Butler first.

Requirement it answers: the OODS (LDM-230 2.6) is a fast-access cache with a higher quality
of service than the Data Backbone: observatory staff and tools must fetch a just-taken raw
within seconds and search the recent data interactively. Loopback only; bounded loops.
Progress goes to stderr; the result is one JSON object on stdout.

Usage: python benchmarks/oods.py [--mb MB] [--downloads N] [--entries N] [--searches N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from astropy.io import fits
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from ldf.config import load_settings
from ldf.db import utcnow
from ldf.oods.daemon import listen
from ldf.oods.handlers import create_app
from ldf.oods.service import Oods
from ldf.oods.tokens import TokenFile, ensure_token_file
from ldf.sim.models import exposure_id, obs_id

DAY_OBS = 20261121
DETECTORS = [f"R{r}{c}_S{s}{t}" for r in "01234" for c in "01234" for s in "012" for t in "012"]


def log(message: str) -> None:
    print(f"[oods bench] {message}", file=sys.stderr, flush=True)


def write_raw(oods: Oods, seq: int, detector: str, mb: int) -> dict[str, Any]:
    """A raw FITS file of about ``mb`` MB at its place in the tree; the ``add`` keywords."""
    oid = obs_id("LSSTCam", DAY_OBS, seq)
    path = oods.path_for("LSSTCam", DAY_OBS, oid, detector)
    path.parent.mkdir(parents=True, exist_ok=True)
    raft, sensor = detector.split("_")
    start = 61365.1 + seq * 0.0005
    header = fits.Header()
    header.update(
        {
            "INSTRUME": "LSSTCam", "OBSID": oid, "DAYOBS": str(DAY_OBS), "SEQNUM": seq,
            "IMGTYPE": "science", "EXPTIME": 30.0, "DARKTIME": 30.9, "FILTER": "r_57",
            "FILTBAND": "r", "MJD-BEG": start, "MJD-END": start + 30.9 / 86400,
            "RA": 150.1, "DEC": -30.2, "ROTPA": 12.0, "AZSTART": 180.0, "ELSTART": 70.0,
            "AMSTART": 1.064, "RAFTBAY": raft, "CCDSLOT": sensor,
            "GROUPID": f"{DAY_OBS}-pair-{(seq + 1) // 2}", "PROGRAM": "BLOCK-365",
            "REASON": "wfd", "OBJECT": "field_42", "SIMULATE": True,
        }
    )  # fmt: skip
    side = max(8, int((mb * 1e6 / 4) ** 0.5))
    pixels = np.random.default_rng(seq).integers(0, 2**17, (side, side), dtype=np.int32)
    hdu = fits.ImageHDU(pixels)
    hdu.header["EXTNAME"] = "Segment10"
    fits.HDUList([fits.PrimaryHDU(header=header), hdu]).writeto(path, overwrite=True)
    data = path.read_bytes()
    return {
        "path": path, "instrument": "LSSTCam", "day_obs": DAY_OBS, "obs_id": oid,
        "exposure_id": exposure_id(DAY_OBS, seq), "detector": detector, "obs_type": "science",
        "size": len(data), "checksum": f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
    }  # fmt: skip


def fill_index(oods: Oods, n: int) -> None:
    """``n`` more index rows (small exposures × detectors), as `Oods.add` would write them."""
    now = utcnow()
    for i in range(n):
        seq, det = 2 + i // len(DETECTORS), DETECTORS[i % len(DETECTORS)]
        oid = obs_id("LSSTCam", DAY_OBS, seq)
        oods.store.upsert(
            {
                "instrument": "LSSTCam", "day_obs": DAY_OBS, "obs_id": oid,
                "exposure_id": exposure_id(DAY_OBS, seq), "detector": det,
                "obs_type": "science", "dataset_type": "raw",
                "path": oods.relpath_for("LSSTCam", DAY_OBS, oid, det),
                "size": 1000, "checksum": f"{i:08x}", "arrived_at": now,
            },
            now,
        )  # fmt: skip


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    sock = listen("127.0.0.1", 0)  # TCP_NODELAY on accepted connections (see its docstring)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def http_server_thread(directory: Path) -> Iterator[str]:
    """Python's static file server (HTTP/1.1, keep-alive) over ``directory`` in a thread."""

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as uvicorn's connections get (fair comparison)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def timed(n: int, one: Callable[[], int]) -> tuple[float, int]:
    """Seconds for ``n`` calls of ``one`` (after one warm-up call) and the bytes they got."""
    one()
    got = 0
    t0 = time.perf_counter()
    for _ in range(n):
        got += one()
    return time.perf_counter() - t0, got


def download(client: httpx.Client, url: str, size: int) -> Callable[[], int]:
    def one() -> int:
        got = 0
        with client.stream("GET", url) as r:
            r.raise_for_status()
            for chunk in r.iter_raw(1 << 20):
                got += len(chunk)
        assert got == size, (got, size)
        return got

    return one


def request(
    client: httpx.Client, url: str, params: dict[str, Any] | None = None
) -> Callable[[], int]:
    def one() -> int:
        r = client.get(url, params=params)
        r.raise_for_status()
        return len(r.content)

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="Size of the downloaded raw (MB).")
    parser.add_argument("--downloads", type=int, default=20, help="Downloads per server.")
    parser.add_argument("--entries", type=int, default=20_000, help="Index rows searched.")
    parser.add_argument("--searches", type=int, default=1000, help="Search requests per server.")
    args = parser.parse_args()
    for name in ("mb", "downloads", "entries", "searches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ldf-bench-oods-"))
    try:
        settings = load_settings(home=tmp / "home")
        with Oods.open(settings) as oods:
            ensure_token_file(oods.token_path)
            token = TokenFile(oods.token_path).first()
            log(f"writing a {args.mb} MB raw and adding it (Butler registration included)")
            kw = write_raw(oods, 1, "R22_S11", args.mb)
            entry = oods.add(kw.pop("path"), **kw)
            log(f"indexing {args.entries} more files")
            fill_index(oods, args.entries)
            middle = 2 + args.entries // 2 // len(DETECTORS)
            probe = oods.find(limit=1, obs_id=obs_id("LSSTCam", DAY_OBS, middle))[0]
            params = {"exposure": probe.exposure_id, "detector": probe.detector}

            answer = tmp / "static" / "answer.json"
            answer.parent.mkdir()
            oods_app = create_app(oods)
            static_app = Starlette(routes=[Mount("/", StaticFiles(directory=oods.root))])
            answer_app = Starlette(routes=[Mount("/", StaticFiles(directory=answer.parent))])
            results: dict[str, dict[str, float]] = {}
            headers = {"Authorization": f"Bearer {token}"}
            with (
                uvicorn_thread(oods_app) as oods_url,
                uvicorn_thread(static_app) as static_url,
                uvicorn_thread(answer_app) as answer_url,
                http_server_thread(oods.root) as plain_url,
                http_server_thread(answer.parent) as plain_answer_url,
                httpx.Client(headers=headers, timeout=60) as client,
            ):
                body = client.get(f"{oods_url}/files", params=params).content
                assert len(json.loads(body)) == 1
                answer.write_bytes(body)
                servers = {
                    "oods": f"{oods_url}/files/{entry.path}",
                    "http_server": f"{plain_url}/{entry.path}",
                    "starlette_static": f"{static_url}/{entry.path}",
                }
                for name, url in servers.items():
                    log(f"download x{args.downloads} from {name}")
                    secs, got = timed(args.downloads, download(client, url, entry.size))
                    results.setdefault(name, {})["download_MB_per_s"] = round(got / 1e6 / secs, 1)
                searches = {
                    "oods": request(client, f"{oods_url}/files", params),
                    "http_server": request(client, f"{plain_answer_url}/answer.json"),
                    "starlette_static": request(client, f"{answer_url}/answer.json"),
                }
                for name, one in searches.items():
                    log(f"search x{args.searches} on {name}")
                    secs, _ = timed(args.searches, one)
                    results[name]["search_requests_per_s"] = round(args.searches / secs, 1)
            leases_left = oods.store.active_leases(utcnow())

        oods_r = results["oods"]

        def ratio(key: str, peer: str) -> float:
            return round(oods_r[key] / results[peer][key], 2)

        print(
            json.dumps(
                {
                    "benchmark": "oods",
                    "requirement": "fetch a just-taken raw within seconds and search recent "
                    "data interactively, at a higher quality of service than the Backbone "
                    "(OODS, LDM-230 2.6)",
                    "file_MB": round(entry.size / 1e6, 1),
                    "index_entries": args.entries + 1,
                    "download_MB_per_s": oods_r["download_MB_per_s"],
                    "search_requests_per_s": oods_r["search_requests_per_s"],
                    "baselines": {
                        "http_server": results["http_server"],
                        "starlette_static": results["starlette_static"],
                    },
                    "ratio": {
                        "download_vs_http_server": ratio("download_MB_per_s", "http_server"),
                        "download_vs_starlette_static": ratio(
                            "download_MB_per_s", "starlette_static"
                        ),
                        "search_vs_http_server_static_answer": ratio(
                            "search_requests_per_s", "http_server"
                        ),
                        "search_vs_starlette_static_answer": ratio(
                            "search_requests_per_s", "starlette_static"
                        ),
                    },
                    "leases_left_after": leases_left,
                    "client": "httpx, one keep-alive connection, sequential, loopback",
                    "index": "sqlite",
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
