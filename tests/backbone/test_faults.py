"""kill -9 during ingest and during a transfer: restart resumes, nothing lost or duplicated,
no partial file ever visible under its final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ldf.backbone.models import ReplicaState, Rule
from ldf.backbone.service import Backbone
from ldf.config import load_settings

SIZE = 24 << 20  # 24 MiB, copied at 8 MB/s: a few seconds to kill into


def _settings(home: Path) -> object:
    return load_settings(
        home=home,
        policies={
            "backbone": {
                "butler": False,
                "dark_grace_s": 0,
                "retry_base_s": 0.01,
                "lease_s": 1.0,
                "link_mbps": {"base->archive": 64.0},
            }
        },
    )


def _run_and_kill(code: str, home: Path, marker: Path, timeout: float = 30) -> None:
    """Run code in a subprocess, SIGKILL it as soon as ``marker`` shows work in flight."""
    env = {**os.environ, "LDF_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if marker.exists() and any(marker.iterdir()):
                break
            if proc.poll() is not None:
                pytest.fail(f"worker ended (rc {proc.returncode}) before it could be killed")
            time.sleep(0.02)
        else:
            pytest.fail("the work never started")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".tmp-")]


def test_kill9_during_transfer_then_resume(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = _settings(home)
    bb = Backbone.open(settings)  # type: ignore[arg-type]
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(SIZE))
    bb.add_rule(Rule(name="r", expression="true", copies=1, sites=["archive"]))
    bb.ingest(src, "big/file", site="base")
    bb.close()
    archive_root = home / "sites" / "archive" / "disk"
    _run_and_kill(
        """
        from ldf.config import load_settings
        from ldf.backbone.service import Backbone
        import os
        s = load_settings(policies={"backbone": {"butler": False, "lease_s": 1.0,
                                                  "link_mbps": {"base->archive": 64.0}}})
        Backbone.open(s).run_transfers()
        """,
        home,
        archive_root / "big",
    )
    final = archive_root / "big" / "file"
    assert not final.exists()  # never a half file under the final name
    assert _temp_files(archive_root)  # the partial copy, under a temp name
    bb = Backbone.open(settings)  # type: ignore[arg-type]
    time.sleep(1.1)  # the dead worker's lease expires
    report = bb.run_transfers()
    assert report.done == 1, report.errors
    assert final.read_bytes() == src.read_bytes()
    assert [r.state for r in bb.store.replicas("big/file")] == [ReplicaState.AVAILABLE] * 2
    assert len(bb.store.transfers()) == 1  # nothing duplicated
    bb.close()


def test_kill9_during_ingest_then_retry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(SIZE))
    base_root = home / "sites" / "base" / "disk"
    (base_root / "raw").mkdir(parents=True)
    # The ingest copies through a slow reader so there is time to kill it mid-copy.
    _run_and_kill(
        f"""
        import time
        from pathlib import Path
        from ldf.config import load_settings
        from ldf.backbone.service import Backbone
        from ldf.backbone import endpoints
        real = endpoints.PosixEndpoint.put
        def slow_put(self, lfn, source, **kw):
            class Slow:
                def __init__(self, f): self.f = f
                def read(self, n=-1):
                    time.sleep(0.05)
                    return self.f.read(min(n if n > 0 else 1 << 20, 1 << 20))
            with open(source, "rb") as f:
                return real(self, lfn, Slow(f), **kw)
        endpoints.PosixEndpoint.put = slow_put
        s = load_settings(policies={{"backbone": {{"butler": False}}}})
        Backbone.open(s).ingest(Path({str(src)!r}), "raw/big", site="base")
        """,
        home,
        base_root / "raw",
    )
    assert not (base_root / "raw" / "big").exists()
    bb = Backbone.open(_settings(home))  # type: ignore[arg-type]
    assert bb.store.get_file("raw/big") is None  # never catalogued half-way
    r = bb.ingest(src, "raw/big", site="base")
    assert r.created
    assert (base_root / "raw" / "big").read_bytes() == src.read_bytes()
    assert bb.endpoint("base").cleanup_partials() >= 1  # the dead ingest's temp file
    assert _temp_files(base_root) == []
    bb.close()
