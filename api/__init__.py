"""haoyuan's HTTP API (Litestar + msgspec): translates HTTP to engine calls and
engine outcomes to HTTP. ``api.app.create_app`` builds the app; ``python -m
api.serve`` runs it under granian with several workers."""
