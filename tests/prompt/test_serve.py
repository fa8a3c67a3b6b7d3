"""`ldf serve prompt`: the device as its own process, commanded over the OCS bus."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from ldf.config import Settings
from ldf.ocs.bus import open_bus


async def test_serve_prompt_comes_up_enabled_and_stops_on_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "LDF_HOME": str(home)}
    proc = subprocess.Popen(  # noqa: ASYNC220 - a server process for the whole test
        [str(Path(sys.executable).with_name("ldf")), "serve", "prompt", "LSSTCam"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    settings = Settings.model_validate({"home": str(home)})
    try:
        bus = await open_bus(settings.bus, settings.home)
        try:
            state = None
            for _ in range(300):
                last = await bus.last("ocs.MTPrompt.evt.summaryState")
                state = last.payload.get("state") if last else None
                if state == "ENABLED":
                    break
                await asyncio.sleep(0.1)
            assert state == "ENABLED"
            ack = await bus.command("MTPrompt", "setPolicy", {"qa_first": False}, timeout=10)
            assert '"qa_first": false' in (ack.result or "")
        finally:
            await bus.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
