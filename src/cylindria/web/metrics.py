"""GET /metrics: the service and each GPU in Prometheus' text format.

Counts that only grow (requests, finished jobs, reconnections) are kept as they
happen; the state of things (GPUs, queues, jobs by state, open streams, the journal's
backlog) is read from the objects that hold it at each scrape, so it cannot drift.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from ..appkeys import EVENTS, GPUS, INPUTS, JOURNAL, REGISTRY, WAITERS, WEBHOOKS
from ..core.records import Job
from .auth import Access, access

routes = web.RouteTableDef()
# No `_created` series: they double the output and no dashboard uses them.
disable_created_metrics()

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOB_SECONDS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LAG_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# How often the event loop's lateness is sampled.
LAG_INTERVAL = 0.25
# Jobs whose end was counted, remembered so that later changes (a webhook delivered)
# do not count them again; the oldest are forgotten past this many.
COUNTED_MEMORY = 100_000


class Metrics:
    """The service's instruments, in a registry of its own (one per app)."""

    def __init__(self, app: web.Application) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.finished = Counter(
            "cylindria_jobs_finished", "Jobs that reached a final state, by GPU and state.",
            ["gpu", "state"], registry=self.registry)
        self.queue_wait = Histogram(
            "cylindria_job_queue_wait_seconds", "From submission to the start of running, "
            "by GPU, for jobs that ran.", ["gpu"], buckets=JOB_SECONDS, registry=self.registry)
        self.run_seconds = Histogram(
            "cylindria_job_run_seconds", "From the start of running to the end, by GPU.",
            ["gpu"], buckets=JOB_SECONDS, registry=self.registry)
        self.comfy_seconds = Histogram(
            "cylindria_comfyui_request_duration_seconds",
            "ComfyUI's REST calls, answered or not, by GPU and endpoint.",
            ["gpu", "endpoint"], buckets=SECONDS, registry=self.registry)
        self.loop_lag = Histogram(
            "cylindria_event_loop_lag_seconds", "How late the event loop ran a timer, "
            f"sampled every {LAG_INTERVAL} s.", buckets=LAG_SECONDS, registry=self.registry)
        self.upload_bytes = Counter(
            "cylindria_input_upload_bytes", "Input file bytes uploaded to each GPU's "
            "ComfyUI.", ["gpu"], registry=self.registry)
        self.upload_seconds = Counter(
            "cylindria_input_upload_seconds", "Seconds spent uploading input files to each "
            "GPU's ComfyUI.", ["gpu"], registry=self.registry)
        self.uploads = Counter(
            "cylindria_input_uploads", "Input files uploaded to each GPU's ComfyUI (a file "
            "it holds already is not sent again).", ["gpu"], registry=self.registry)
        self.registry.register(StateCollector(app))
        self._counted: dict[tuple[str, int], None] = {}
        # Answers by (route, method, status): the count in each latency bucket (the last
        # one past every bound), then the sum of seconds. The counts by status and the
        # histograms by route and method are summed from them at scrape time.
        self.requests: dict[tuple[str, str, int], list[float]] = {}

    def count_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answer. Every request passes here, so it is plain counting (exported at
        scrape time), one dictionary look-up: prometheus-client's instruments cost a
        third of /jobstatus's throughput when called per request."""
        tally = self.requests.get((route, method, status))
        if tally is None:
            tally = self.requests[route, method, status] = [0] * (len(SECONDS) + 1) + [0.0]
        tally[bisect.bisect_left(SECONDS, seconds)] += 1
        tally[-1] += seconds

    def request_totals(self) -> tuple[dict[tuple[str, str, int], int],
                                      dict[tuple[str, str], list[float]]]:
        """The answers counted by (route, method, status), and by (route, method) the
        count in each latency bucket then the sum of seconds."""
        counts: dict[tuple[str, str, int], int] = {}
        times: dict[tuple[str, str], list[float]] = {}
        for (route, method, status), tally in self.requests.items():
            counts[route, method, status] = int(sum(tally[:-1]))
            timing = times.setdefault((route, method), [0] * len(tally))
            for n, value in enumerate(tally):
                timing[n] += value
        return counts, times

    def comfy_timer(self, gpu: int) -> Callable[[str, float], None]:
        """What a GPU's ComfyUI client tells of each REST call."""
        label = str(gpu)

        def observe(endpoint: str, seconds: float) -> None:
            self.comfy_seconds.labels(label, endpoint).observe(seconds)
        return observe

    def uploaded(self, gpu: int, size: int, seconds: float) -> None:
        """One input file put on a GPU's ComfyUI."""
        label = str(gpu)
        self.uploads.labels(label).inc()
        self.upload_bytes.labels(label).inc(size)
        self.upload_seconds.labels(label).inc(seconds)

    def on_change(self, job: Job) -> None:
        """A registry subscriber: counts each attempt's end once."""
        if not job.terminal or (job.job_id, job.attempt) in self._counted:
            return
        self._count(job, str(job.gpu_id) if job.gpu_id is not None else "none")

    def _count(self, job: Job, gpu: str) -> None:
        self._counted[(job.job_id, job.attempt)] = None
        if len(self._counted) > COUNTED_MEMORY:
            del self._counted[next(iter(self._counted))]
        self.finished.labels(gpu, job.state.value).inc()
        if job.started_at is not None:
            self.queue_wait.labels(gpu).observe(
                max((job.started_at - job.submitted_at).total_seconds(), 0.0))
            if job.finished_at is not None:
                self.run_seconds.labels(gpu).observe(
                    max((job.finished_at - job.started_at).total_seconds(), 0.0))

    async def watch_loop(self) -> None:
        """Sample the event loop's lateness for as long as the app runs."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_INTERVAL
            await asyncio.sleep(LAG_INTERVAL)
            self.loop_lag.observe(max(loop.time() - due, 0.0))


METRICS = web.AppKey("metrics", Metrics)


class StateCollector(Collector):
    """What is true now, read at each scrape."""

    def requests(self) -> Iterator[Any]:
        metrics = self.app.get(METRICS)
        if metrics is None:  # registering the collector asks it before the app has it
            return
        counts = CounterMetricFamily("cylindria_http_requests",
                                     "HTTP requests answered, by route, method and status.",
                                     labels=["route", "method", "status"])
        request_counts, request_times = metrics.request_totals()
        for (route, method, status), count in sorted(request_counts.items()):
            counts.add_metric([route, method, str(status)], count)
        yield counts
        seconds = HistogramMetricFamily(
            "cylindria_http_request_duration_seconds",
            "Time to answer, by route and method (route startjob is the submission "
            "latency).", labels=["route", "method"])
        for (route, method), timing in sorted(request_times.items()):
            running, buckets = 0, []
            for bound, count in zip((*map(str, SECONDS), "+Inf"), timing[:-1], strict=True):
                running += count
                buckets.append((bound, running))
            seconds.add_metric([route, method], buckets, sum_value=timing[-1])
        yield seconds

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        app = self.app
        gpus = app.get(GPUS) or []
        registry = app[REGISTRY]
        labels = ["gpu"]
        up = GaugeMetricFamily("cylindria_gpu_reachable",
                               "1 when the GPU's ComfyUI answered its last check.", labels=labels)
        listener = GaugeMetricFamily("cylindria_gpu_listener_connected",
                                     "1 while the GPU's websocket listener is connected.",
                                     labels=labels)
        drained = GaugeMetricFamily("cylindria_gpu_drained", "1 while the GPU is drained.",
                                    labels=labels)
        reconnects = CounterMetricFamily("cylindria_gpu_listener_reconnects",
                                         "Websocket reconnections.", labels=labels)
        messages = CounterMetricFamily("cylindria_gpu_websocket_messages",
                                       "Websocket text messages from ComfyUI, by type.",
                                       labels=["gpu", "type"])
        queue = GaugeMetricFamily("cylindria_gpu_queue_jobs",
                                  "This service's jobs on the GPU, running or pending.",
                                  labels=["gpu", "stage"])
        comfy_queue = GaugeMetricFamily("cylindria_gpu_comfyui_queue_remaining",
                                        "ComfyUI's own queue_remaining (absent when unknown).",
                                        labels=labels)
        for gpu in gpus:
            name = str(gpu.index)
            probe = gpu.last_probe
            up.add_metric([name], float(probe is not None and probe.reachable
                                        and gpu.unreachable_since is None))
            listener.add_metric([name], float(gpu.listener_connected))
            drained.add_metric([name], float(gpu.drained))
            reconnects.add_metric([name], gpu.reconnects)
            for kind, count in sorted(gpu.messages.items()):
                messages.add_metric([name, kind], count)
            running = 1.0 if registry.running_on(gpu.index) is not None else 0.0
            queue.add_metric([name, "running"], running)
            queue.add_metric([name, "pending"], float(registry.queued_count(gpu.index)))
            if gpu.queue_remaining is not None:
                comfy_queue.add_metric([name], float(gpu.queue_remaining))
        yield from (up, listener, drained, reconnects, messages, queue, comfy_queue)

        jobs = GaugeMetricFamily("cylindria_jobs", "Jobs held in memory, by state.",
                                 labels=["state"])
        for state, count in registry.counts().items():
            jobs.add_metric([state], float(count))
        yield jobs
        yield GaugeMetricFamily("cylindria_jobs_held",
                                "GpuId=auto jobs waiting in Cylindria's queue for a GPU.",
                                value=float(len(registry.held)))
        yield from self.requests()
        events = app[EVENTS]
        yield GaugeMetricFamily("cylindria_event_streams_open", "Open /events/ streams.",
                                value=float(events.streams))
        yield CounterMetricFamily("cylindria_event_streams_dropped",
                                  "Event stream clients cut off for falling behind.",
                                  value=float(events.dropped))
        yield GaugeMetricFamily("cylindria_waiters",
                                "Requests waiting with ?wait= for a job to finish.",
                                value=float(app[WAITERS].count))
        if WEBHOOKS in app:
            hooks = CounterMetricFamily("cylindria_webhook_deliveries",
                                        "Webhook delivery attempts, by outcome.",
                                        labels=["outcome"])
            for outcome, count in sorted(app[WEBHOOKS].outcomes.items()):
                hooks.add_metric([outcome], count)
            yield hooks
        if INPUTS in app:
            store = app[INPUTS]
            yield GaugeMetricFamily("cylindria_input_store_files", "Input files stored.",
                                    value=float(len(store)))
            yield GaugeMetricFamily("cylindria_input_store_bytes",
                                    "Bytes of input files stored.",
                                    value=float(store.total_bytes))
        if JOURNAL in app:
            journal = app[JOURNAL]
            yield GaugeMetricFamily("cylindria_journal_backlog",
                                    "Writes handed to the journal's thread and not done.",
                                    value=float(journal.backlog))
            yield SummaryMetricFamily("cylindria_journal_commit_seconds",
                                      "From handing a batch of changes to the writer to "
                                      "its commit.", count_value=journal.commits,
                                      sum_value=journal.commit_seconds)
            yield GaugeMetricFamily("cylindria_journal_writable",
                                    "1 while the state file takes writes.",
                                    value=float(journal.writable))


@routes.get("/metrics", name="metrics")
@access(Access.METRICS)
async def get_metrics(request: web.Request) -> web.Response:
    # Probes are shared and cached for a second; a hung ComfyUI costs status_timeout.
    await asyncio.gather(*(gpu.probe() for gpu in request.app[GPUS]))
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
