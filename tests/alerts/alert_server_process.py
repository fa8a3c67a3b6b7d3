"""A stand-alone alert service process for the kill -9 tests: serve until killed.

Usage: python -m tests.alerts.alert_server_process DB_URL ROOT CREDENTIALS PORT_FILE
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ldf.alerts.auth import Credentials
from ldf.alerts.daemon import ServerThread
from ldf.alerts.service import AlertService
from ldf.alerts.storage import AlertStore


def main() -> None:
    db, root, creds, port_file = sys.argv[1:5]
    service = AlertService(AlertStore.open(db), Path(root))
    with ServerThread(service, Credentials(Path(creds)), background=False) as server:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(server.url)
        tmp.replace(port_file)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main()
