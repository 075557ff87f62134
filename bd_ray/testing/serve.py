"""A bd-ray Serve application on this machine, started and torn down for a test or a benchmark."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from bd_ray.testing.ports import free_port

__all__ = ["local_serve_app"]


@contextlib.contextmanager
def local_serve_app(app_args: dict[str, Any], name: str, *, num_cpus: int = 4,
                    proxy_location: str | None = None) -> Iterator[str]:
    """Run the bd-ray OpenAI app (``bd_ray.serve.app.build_app(app_args)``) on 127.0.0.1; yield its URL.

    Starts a private Ray instance with ``num_cpus`` logical CPUs (no dashboard, worker logs not
    streamed to the driver) unless this process is already connected to one (e.g. a simulated
    cluster), then Serve's HTTP proxy on a free port of 127.0.0.1 (``proxy_location``, e.g.
    ``"HeadOnly"``, passed to ``serve.start`` when given) and the app under ``name`` at route ``/``.
    On exit Serve is shut down, and Ray too if it was started here.

    Yields ``http://127.0.0.1:<port>``.
    """
    import ray
    from ray import serve

    from bd_ray.serve.app import build_app

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        opts = {} if proxy_location is None else {"proxy_location": proxy_location}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, **opts)
        serve.run(build_app(app_args), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
