"""How ``xmodal serve`` runs uvicorn: the options that go with the SIGTERM drain (service.drain)."""

from __future__ import annotations

from service.drain import GRACE_AFTER_DEADLINE_S
from service.settings import Settings


def serving_options(settings: Settings) -> dict:
    """uvicorn.run's keyword options for these settings (besides the app, host, port and workers)."""
    return {"log_level": "info", "access_log": False, "timeout_graceful_shutdown": GRACE_AFTER_DEADLINE_S}
