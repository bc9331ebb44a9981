"""The FastAPI application (routes, schemas, settings, cache) and the `xmodal` CLI. Only this package speaks HTTP."""
