"""`create_app(settings)`: wiring only; every resource is made in a cleanup context."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from . import dashboard
from .appkeys import (
    CLUSTER,
    EVENTS,
    GPUS,
    INPUTS,
    JOBS,
    JOURNAL,
    PEERS,
    REGISTRY,
    SETTINGS,
    SIGNINS,
    TASKS,
    WAITERS,
    WEBHOOKS,
)
from .config import Settings, trusted_networks
from .core import cancels
from .core.estimates import RunTimes
from .core.jobs import JobsService
from .core.reading import WorkflowReader
from .core.registry import Registry
from .nodes import NodeInfo, advertised_url
from .store.inputs import InputStore, shared_store
from .store.journal import Journal, open_journal
from .upstream.comfy import CallbackClient, ComfyClient, open_session
from .upstream.fetch import InputFetcher
from .upstream.gpus import Gpu
from .upstream.heartbeat import Cluster, heartbeat, rescuer
from .upstream.inputs import InputDelivery
from .upstream.listeners import cancel_and_wait, dispatch_held, listen, poll, retry_owed
from .upstream.peers import PeerClient
from .upstream.webhooks import WebhookSender
from .web import (
    api,
    clusterevents,
    events,
    gpus,
    inputs,
    metrics,
    openapi,
    outputs,
    params,
    render,
)
from .web.auth import make_auth_middleware
from .web.clients import TRUSTED_PROXIES, TrustedProxies
from .web.eventhub import EventHub
from .web.middlewares import make_error_middleware
from .web.signins import Signins
from .web.waiters import Waiters

log = logging.getLogger(__name__)

# Seconds between writes of learned run times to the state file.
RUN_TIMES_EVERY = 5.0



def create_app(settings: Settings) -> web.Application:
    signins = Signins()
    app = web.Application(client_max_size=params.MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[SIGNINS] = signins
    app[TRUSTED_PROXIES] = TrustedProxies(trusted_networks(settings.trusted_proxies))
    registry = Registry(memory_jobs=settings.memory_jobs)
    app[REGISTRY] = registry
    app[EVENTS] = EventHub(settings.event_buffer,
                           functools.partial(render.status_bytes, router=app.router),
                           clustered=settings.database_url is not None)
    registry.subscribe(app[EVENTS].publish)
    # A held job another node took (nodes sharing a database): its streams end here.
    registry.on_leave(app[EVENTS].end_job)
    app[WAITERS] = Waiters(settings.max_waiters, settings.max_waiters_per_address)
    registry.subscribe(app[WAITERS].publish)
    registry.on_leave(app[WAITERS].let_go)
    app[metrics.METRICS] = metrics.Metrics(app)
    # Outermost first: every error as JSON and every answer counted, then the key.
    app.middlewares.append(make_error_middleware(app[metrics.METRICS].count_request))
    if settings.api_key:
        app.middlewares.append(make_auth_middleware(settings.api_key, signins,
                                                    "dashboard_login", settings.metrics_public))
    registry.subscribe(app[metrics.METRICS].on_change)
    app[TASKS] = {}
    node = NodeInfo(settings.node_name,
                    advertised_url(settings.host, settings.port, settings.advertise_url),
                    settings.timing.heartbeat_interval)
    app[CLUSTER] = Cluster(node, enabled=settings.database_url is not None)

    dashboard.setup(app)
    for module in (api, inputs, outputs, gpus, events, metrics):
        app.add_routes(module.routes)
    openapi.setup(app)
    # Open event streams end at shutdown, so the server does not wait on them.
    app.on_shutdown.append(close_event_streams)
    # Requests waiting with ?wait= answer at once with what they have.
    app.on_shutdown.append(wake_waiters)

    # Teardown runs in reverse: listeners stop, then webhooks and housekeeping, then
    # the session they all use is closed, and last the journal.
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(webhooks_ctx)
    app.cleanup_ctx.append(housekeeping_ctx)
    app.cleanup_ctx.append(listeners_ctx)
    app.cleanup_ctx.append(nodes_ctx)
    return app


async def close_event_streams(app: web.Application) -> None:
    app[EVENTS].close()


async def wake_waiters(app: web.Application) -> None:
    app[WAITERS].close()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The journal and what it kept, the process's one ClientSession, each GPU's
    ComfyUI client, and the jobs service."""
    settings = app[SETTINGS]
    timing = settings.timing
    registry = app[REGISTRY]
    journal, loaded = await open_journal(settings.state_file, settings.memory_jobs,
                                         registry.saved, settings.state_sync_full,
                                         timing.state_retry, settings.database_url,
                                         app[CLUSTER].node)
    app[JOURNAL] = journal
    registry.subscribe(journal.note)
    log.info("jobs are kept in %s: %d job(s) held, %d loaded into memory, %d in flight",
             journal.name, loaded.held, len(loaded.jobs),
             sum(not job.terminal for job in loaded.jobs))
    if journal.clustered:
        node = app[CLUSTER].node
        log.info("node %s (others reach it at %s); jobs in flight of other nodes, left "
                 "to them: %s", node.name, node.advertise_url,
                 ", ".join(f"{name} ({n})" for name, n in loaded.elsewhere.items()) or "none")
    # Decodes large JSON (workflows, ComfyUI's answers) in a worker process.
    reader = WorkflowReader(settings.max_nodes)
    # With PostgreSQL, every input file is kept in the database too, for every node.
    store = InputStore(settings.input_dir, settings.input_store_max, registry.uses_input,
                       sync=settings.state_sync_full,
                       shared=shared_store(settings.database_url))
    await store.open()
    app[INPUTS] = store
    try:
        async with open_session(settings.num_gpus, timing) as session:
            # The clientId is the state file's: after a restart, ComfyUI sends the events
            # of earlier prompts to the new listeners; two Cylindrias never share one.
            app[GPUS] = [Gpu(index=n, url=settings.gpu_url(n),
                             client_id=f"cylindria-{loaded.install_id}-gpu{n}",
                             comfy=ComfyClient(session, settings.gpu_url(n),
                                               timing.request_timeout, reader.decode),
                             timing=timing)
                         for n in range(settings.num_gpus)]
            for gpu in app[GPUS]:
                gpu.comfy.observe = app[metrics.METRICS].comfy_timer(gpu.index)
            if loaded.run_times:
                registry.run_times = RunTimes.from_state(loaded.run_times)
            delivery = InputDelivery(store, InputFetcher.for_settings(session, settings),
                                     settings.input_max, timing.input_fetch_timeout,
                                     timing.request_timeout)
            delivery.observe = app[metrics.METRICS].uploaded
            app[JOBS] = JobsService(registry, app[GPUS], settings, journal, reader, delivery)
            app[JOBS].restore(loaded.jobs, loaded.last_seq, loaded.evicted_through)
            # With PostgreSQL, held jobs wait in the nodes' one line, by the same aging;
            # a job another node took is let go here.
            journal.queue_aging(settings.priority_aging)
            journal.on_taken = app[JOBS].let_go
            app[PEERS] = PeerClient(session, app[CLUSTER].node.name, settings.api_key,
                                    timing.request_timeout)
            # What start-up loaded lives long: keep the garbage collector's full passes
            # from walking it again and again (they would pause every request).
            gc.freeze()
            app[WEBHOOKS] = WebhookSender(registry, CallbackClient.for_settings(session, settings),
                                          settings.webhook_secret, timing,
                                          functools.partial(render.status_bytes,
                                                            router=app.router))
            try:
                yield
            finally:
                await app[JOBS].close()
                for gpu in app[GPUS]:
                    await gpu.close()
    finally:
        await store.close()
        await journal.close()


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    sender = app[WEBHOOKS]
    if not app[SETTINGS].webhook_secret:
        log.info("CYLINDRIA_WEBHOOK_SECRET is not set: webhooks are sent unsigned")
    app[REGISTRY].subscribe(sender.on_change)
    sender.resume(app[REGISTRY].webhooks_due())
    try:
        yield
    finally:
        await sender.close()


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """One task that drops finished jobs past their retention, from the journal and
    from memory."""
    settings = app[SETTINGS]
    task = asyncio.create_task(housekeep(app[REGISTRY], app[JOURNAL], app[INPUTS], settings),
                               name="housekeeping")
    keeper = asyncio.create_task(keep_run_times(app[REGISTRY], app[JOURNAL]),
                                 name="run-times")
    try:
        yield
    finally:
        await cancel_and_wait([task, keeper])
        await app[JOURNAL].save_run_times(app[REGISTRY].run_times.to_state())


async def keep_run_times(registry: Registry, journal: Journal) -> None:
    """Write learned run times to the state file when they changed, every few seconds
    (and once more at shutdown), so a restart forecasts at once."""
    saved = registry.run_times.version
    while True:
        await asyncio.sleep(RUN_TIMES_EVERY)
        times = registry.run_times
        if times.version != saved:
            saved = times.version
            await journal.save_run_times(times.to_state())


async def housekeep(registry: Registry, journal: Journal, store: InputStore,
                    settings: Settings) -> None:
    while True:
        cutoff = registry.retention_cutoff(settings.retention_days)
        pruned = await journal.prune(cutoff)
        # With nodes sharing a database, their job events past the retention too.
        await journal.prune_events(cutoff.timestamp())
        dropped = await store.prune(cutoff.timestamp())
        if dropped:
            log.info("dropped %d input file(s) no job has used for %g day(s)", dropped,
                     settings.retention_days)
        # In steps of a few hundred, so other work goes on in between.
        while True:
            if not registry.evict(retain_after=cutoff):
                break
            await asyncio.sleep(0)
        if pruned:
            log.info("dropped %d job(s) finished more than %g day(s) ago", pruned,
                     settings.retention_days)
        await asyncio.sleep(settings.timing.housekeeping_interval)


async def listeners_ctx(app: web.Application) -> AsyncIterator[None]:
    """One websocket listener and one queue poller per GPU, each a named task."""
    timing = app[SETTINGS].timing
    tasks = app[TASKS]
    for gpu in app[GPUS]:
        wake = asyncio.Event()
        tasks[f"listener-gpu{gpu.index}"] = asyncio.create_task(
            listen(gpu, app[JOBS], timing, wake), name=f"listener-gpu{gpu.index}")
        tasks[f"poller-gpu{gpu.index}"] = asyncio.create_task(
            poll(gpu, app[JOBS], timing, wake), name=f"poller-gpu{gpu.index}")
    tasks["dispatcher"] = asyncio.create_task(dispatch_held(app[JOBS], timing),
                                              name="dispatcher")
    tasks["read-costs"] = asyncio.create_task(app[JOBS].read_costs_back(),
                                              name="read-costs")
    tasks["owed-retries"] = asyncio.create_task(retry_owed(app[JOBS], timing),
                                                name="owed-retries")
    tasks["loop-lag"] = asyncio.create_task(app[metrics.METRICS].watch_loop(), name="loop-lag")
    try:
        yield
    finally:
        await cancel_and_wait(list(tasks.values()))
        tasks.clear()


async def nodes_ctx(app: web.Application) -> AsyncIterator[None]:
    """With PostgreSQL: this node's heartbeat, a named task; stopping marks its row."""
    journal = app[JOURNAL]
    if not journal.clustered:
        yield
        return
    task = asyncio.create_task(heartbeat(app[CLUSTER], journal.beat, app[GPUS], app[JOBS]),
                               name="heartbeat")
    # Dead nodes' jobs settled as lost, once per heartbeat interval.
    grace, settings = app[SETTINGS].timing.node_grace, app[SETTINGS]
    rescuing = asyncio.create_task(rescuer(lambda: journal.rescue(
        grace, settings.retry_lost, settings.max_attempts),
                                           app[CLUSTER].node.heartbeat_seconds), name="rescuer")
    # Cancels other nodes pass to this one: read every heartbeat interval, and at once
    # when a notification wakes the listener's thread.
    wake = asyncio.Event()
    # The nodes' one line of held jobs: a job put in line wakes the dispatcher; one of
    # this node's taken by another is let go (checked every heartbeat interval too).
    jobs, name = app[JOBS], app[CLUSTER].node.name
    taken = asyncio.Event()

    def on_queue(payload: str) -> None:
        (taken if payload == name else jobs.wake).set()

    listener = journal.cancel_listener(wake.set, on_queue)
    listener.start()
    # Every node's job events, read from the database into this node's streams.
    reader = journal.events_reader(clusterevents.feeder(app))
    reader.start()
    relay = asyncio.create_task(cancels.follow_cancels(
        jobs, app[CLUSTER].node.heartbeat_seconds, wake), name="cancel-relay")
    letting_go = asyncio.create_task(jobs.follow_taken(
        app[CLUSTER].node.heartbeat_seconds, taken), name="taken-jobs")
    try:
        yield
    finally:
        await cancel_and_wait([task, relay, rescuing, letting_go])
        await listener.stop()
        await reader.stop()
        await journal.leave()
