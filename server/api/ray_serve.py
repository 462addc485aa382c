"""`loraswap serve-ray`: the Ray Serve application (an ingress and N engine replicas) built from
the same settings as `loraswap serve`, deployed on a local Ray instance or a cluster."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from config.ray_settings import RaySettings
from config.settings import Settings

log = logging.getLogger("loraswap.ray")

APP_NAME = "loraswap"
ENGINE_DEPLOYMENT = "LoraEngine"
INGRESS_DEPLOYMENT = "Ingress"
MULTIPART_ROOM = 2 * 2**20  # the config file (<= 1 MiB) and the multipart framing around the weights
INGRESS_MAX_ONGOING = 10_000
SHUTDOWN_MARGIN_S = 30.0  # beyond the drain time, for Ray to stop its actors and processes  # the ingress only forwards; the replicas' limits are what bind


def engine_options(settings: Settings, ray: RaySettings) -> dict[str, Any]:
    """The engine deployment's options. A replica takes at most max_num_seqs requests at once
    (then Ray prefers another replica holding the adapter, or waits); the ingress holds up to
    max_waiting per replica beyond that and answers 429 past it, as one process would."""
    return {
        "name": ENGINE_DEPLOYMENT,
        "num_replicas": ray.replicas,
        "ray_actor_options": {"num_cpus": ray.replica_cpus, "num_gpus": ray.replica_gpus},
        "max_ongoing_requests": ray.replica_max_ongoing or settings.max_num_seqs,
        "max_queued_requests": settings.max_waiting * ray.replicas,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": settings.drain_timeout,
        "logging_config": {"enable_access_log": False},  # internal calls; the ingress logs each request
    }


def build_app(settings: Settings, ray: RaySettings, *, affinity: bool = True, request_router: str | None = None) -> Any:
    """The bound application (ray.serve Application) `serve.run` deploys. `affinity=False`
    tags no request with its adapter and `request_router` replaces Ray's default router
    ("module:Class"): bench/ray_multiplex.py's baseline, Ray's round robin."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from server.api.ray_ingress import Ingress
    from server.api.ray_replica import EngineReplica

    options = engine_options(settings, ray)
    if request_router is not None:
        options["request_router_config"] = RequestRouterConfig(request_router_class=request_router)
    engine = serve.deployment(**options)(EngineReplica)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING, graceful_shutdown_timeout_s=settings.drain_timeout,
    )(Ingress)
    max_body = int(settings.max_upload_mb * 1e6) + MULTIPART_ROOM
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    return ingress.bind(engine.bind(settings), replicas=ray.replicas, max_body=max_body, admin_token=admin_token,
                        api_key=api_key, affinity=affinity)


def serve_ray(settings: Settings, ray_settings: RaySettings) -> int:
    """Deploy, serve until SIGTERM or SIGINT, then take the application down (and the local
    Ray instance, if this process started it). Exit code 1 if it could not be deployed."""
    import ray
    from ray import serve

    local = ray_settings.ray_address is None
    ray.init(
        address=ray_settings.ray_address, num_cpus=ray_settings.ray_num_cpus if local else None,
        include_dashboard=False, configure_logging=False,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C or SIGTERM: do not wait for the drain
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port, "root_path": settings.root_path})
        serve.run(build_app(settings, ray_settings), name=APP_NAME, route_prefix="/")
    except Exception as exc:
        log.error("cannot serve: %s", exc)
        return _take_down(local, settings.drain_timeout, 1)
    log.info("serving %d replicas at http://%s:%d", ray_settings.replicas, settings.host, settings.port)
    stop.wait()
    log.info("stopping: running requests get up to %.0f s", settings.drain_timeout)
    return _take_down(local, settings.drain_timeout, 0)


def _take_down(local: bool, grace_s: float, code: int) -> int:
    """Delete the application (stop the local Ray instance with it), waiting at most grace_s
    plus a margin: a Ray whose own processes were already killed (a signal to the whole process
    group) would otherwise leave this process waiting forever. Returns `code` to exit with."""
    import ray
    from ray import serve

    def down() -> None:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()

    worker = threading.Thread(target=down, name="loraswap-ray-shutdown", daemon=True)
    worker.start()
    worker.join(grace_s + SHUTDOWN_MARGIN_S)
    if worker.is_alive():
        log.error("Ray did not shut down within %.0f s; exiting without it", grace_s + SHUTDOWN_MARGIN_S)
        logging.shutdown()
        os._exit(code)  # Ray's exit hooks would wait on the same dead processes
    return code
