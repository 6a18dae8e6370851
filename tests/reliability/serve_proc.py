"""``darex serve`` as a process, plus one file: the fingerprint of the base as it was loaded.

``python -m tests.reliability.serve_proc FINGERPRINT_FILE`` builds the real app from the
environment (``DAREX_*``, as ``darex serve`` does) and runs it under uvicorn; once the
engine is up it writes ``{"loaded": Engine.loaded_fingerprint}`` to the file, so a test can
compare the base across a SIGKILL and a restart.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import uvicorn

from server.api import create_app
from server.logging import setup_logging
from server.settings import Settings


def _report(app, out: Path) -> None:
    while True:
        engine = getattr(app.state.darex, "engine", None)
        if engine is not None and app.state.darex.scheduler is not None:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"loaded": engine.loaded_fingerprint}))
            tmp.replace(out)
            return
        time.sleep(0.05)


def main() -> None:
    settings = Settings()
    settings.check_serving()
    setup_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    threading.Thread(target=_report, args=(app, Path(sys.argv[1])), daemon=True).start()
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
