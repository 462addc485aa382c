"""A Ray Serve engine replica: one whole loraswap server (model, KV cache, K LoRA slots, the
shared adapter store) serving, in process, the requests the ingress forwards to it.

A request's adapter is its multiplexed model id: Ray's router sends it to a replica that
reported the id as loaded, else to the replica with the fewest. "Loaded" here is the last K
adapters this replica was asked for (K = its slots, the same number `--max-loras` gives one
process, so capacity is configured once); loading one reads and validates it into the CPU
cache, and the engine's slot table puts it in a slot when its first row runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import ray
from ray import serve

from config.settings import Settings
from server.api.app import create_app
from server.api.asgi_call import Envelope, Head, Whole, call_app
from server.bootstrap import build_service
from server.service import CompletionService

log = logging.getLogger("loraswap.ray")


class EngineReplica:
    """The deployment class (decorated by server/api/ray_serve.py). The constructor returns once
    the model is loaded, so Ray counts a replica only when it can serve."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(
            lambda metrics: build_service(settings, metrics),
            admin_token=settings.admin_token.get_secret_value() if settings.admin_token else None,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        )
        holder = self.app.state.holder
        holder.start()
        holder.join()
        if holder.service is None:  # Ray reports it and retries the replica
            raise RuntimeError(f"the model failed to load: {holder.error}")
        self.service: CompletionService = holder.service
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.slots = max(1, self.service.max_loras or 1)

        async def load(model_id: str) -> str:  # into the CPU cache; a slot takes it when its row runs
            await asyncio.to_thread(self.service.catalog.resolve, model_id, count=False)
            return model_id

        # Set per instance: the capacity is known only once the model (and --max-loras auto) is.
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=self.slots)(load)
        log.info("replica %s ready: %s with %d slots", self.replica_id, self.service.model_name, self.slots)

    async def handle(self, envelope: Envelope) -> AsyncIterator[Whole | Head | bytes]:
        """The request through this replica's app: a Whole, or a Head and then SSE chunks."""
        model_id = serve.get_multiplexed_model_id()
        # Only a stored adapter enters Ray's set: the wrapper evicts its oldest entry before it
        # loads, so a name deleted since the ingress tagged it must not push a real one out.
        if model_id and await asyncio.to_thread(self.service.catalog.__contains__, model_id):
            try:
                await self.load_adapter(model_id)
            except Exception as exc:  # the app itself answers with the right error (404, 400...)
                log.debug("not loading %r: %s", model_id, exc)
        async with contextlib.aclosing(call_app(self.app, envelope)) as parts:  # cancelled: the app is too
            async for part in parts:
                yield part

    async def call(self, envelope: Envelope) -> tuple[str, Whole]:
        """(this replica, the whole answer) of a request sent to every replica: /ready,
        /metrics, admin slot loads."""
        async with contextlib.aclosing(call_app(self.app, envelope)) as parts:
            async for part in parts:
                if isinstance(part, Whole):
                    return self.replica_id, part
                raise RuntimeError(f"{envelope.path} answered with a stream")
        raise RuntimeError(f"{envelope.path} answered nothing")

    async def describe(self) -> dict[str, object]:
        """Who this replica is (id, model, slot count, process, node) and the adapters it can
        serve (the shared store's and the start-up ones every replica has): the names the
        ingress tags with affinity."""
        adapters = [info.name for info in await asyncio.to_thread(self.service.catalog.all)]
        return {"replica": self.replica_id, "model": self.service.model_name, "slots": self.slots,
                "pid": os.getpid(), "node": ray.util.get_node_ip_address(), "adapters": adapters}

    async def refresh(self) -> str:
        """Follow the shared store now: another replica just changed it (an old version is
        retired from its slot once its rows end)."""
        await asyncio.to_thread(self.service.catalog.refresh)
        return self.replica_id

    def check_health(self) -> None:
        """Ray's periodic probe: raising marks this replica unhealthy, and Ray replaces it."""
        problem = self.service.engine.health()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> None:  # Ray calls it when the replica is shut down
        service = getattr(self, "service", None)
        if service is not None:
            service.engine.stop()
