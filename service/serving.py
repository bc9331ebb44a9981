"""How ``xmodal serve`` runs uvicorn: the options that go with the SIGTERM drain (service.drain) and the logs
(service.logs: uvicorn's lines in the same format, with request ids)."""

from __future__ import annotations

from service.drain import GRACE_AFTER_DEADLINE_S
from service.logs import uvicorn_log_config
from service.settings import Settings


def serving_options(settings: Settings) -> dict:
    """uvicorn.run's keyword options for these settings (besides the app, host, port and workers)."""
    return {
        "log_level": "info",
        "log_config": uvicorn_log_config(),
        "access_log": False,  # service.middleware.RequestId logs each request, with its id
        "timeout_graceful_shutdown": GRACE_AFTER_DEADLINE_S,
    }
