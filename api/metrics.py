"""Prometheus metrics of every worker process, in one scrape.

``haoyuan api`` / ``haoyuan serve`` (``api.serve``) set
``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before granian starts its
workers (unless the operator set one), so prometheus-client's multiprocess
mode is on: each worker writes its values to files there and ``GET /metrics``,
whichever worker answers, reads them all (``MultiProcessCollector``). Series
carry a ``worker`` label (the pid): counters and histograms add up across
workers; the lag gauges are the same in every worker (``max`` across them),
the in-flight and inventory gauges are per worker. Without the directory (an
app built in process, as the tests do) each worker keeps its own registry.

- ``haoyuan_decisions_total{op, outcome}``: engine decisions (and local
  answers: ``outcome`` ``sold-out-cached``, ``not-open-cached``, ``shed``;
  for holds not decided now, ``shed-age`` (waited past max_request_age_ms),
  ``queued`` (behind the waiting room's line), ``waiting`` (came back early
  with a ticket)).
- ``haoyuan_waiting_room_waiting``: places in the waiting room's line not
  admitted yet.
- ``haoyuan_http_request_duration_seconds{route, method, status}``.
- ``haoyuan_engine_call_duration_seconds{op}``.
- ``haoyuan_inventory_free_units{session}`` / ``..._capacity_units``: from
  availability reads.
- ``haoyuan_writer_pending_entries``, ``haoyuan_writer_undelivered_entries``,
  ``haoyuan_outbox_dead_letters``, ``haoyuan_writer_oldest_pending_age_seconds``,
  ``haoyuan_outbox_stream_length``: the outbox writer's lag.
- ``haoyuan_his_pending_bookings``, ``haoyuan_his_oldest_pending_age_seconds``: what the
  HIS forwarder has still to send (bookings, cancels, unknown outcomes:
  ``engine.forwarder.his_lag``, the one definition).
- ``haoyuan_his_attention_bookings{state}``: bookings the forwarder stopped
  retrying (``lookup_cancelled``, ``cancel_refused``): alert above 0; an
  operator runs ``haoyuan his resolve``.
- ``haoyuan_refund_orders{state}``: refund orders ``due``, ``requested``,
  ``failed`` and ``stuck`` (failed past their attempts: alert above 0, finance
  acts), and ``haoyuan_refund_oldest_open_age_seconds``.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        w = ["worker"]
        self.worker = str(os.getpid())
        self._decisions = Counter(
            "haoyuan_decisions", "Engine decisions and local answers by outcome",
            [*w, "op", "outcome"], registry=r)
        self._requests = Histogram(
            "haoyuan_http_request_duration_seconds", "HTTP request latency",
            [*w, "route", "method", "status"], buckets=_BUCKETS, registry=r)
        self._engine = Histogram(
            "haoyuan_engine_call_duration_seconds", "Engine call latency",
            [*w, "op"], buckets=_BUCKETS, registry=r)
        self.inflight = Gauge(
            "haoyuan_engine_inflight", "Engine calls in flight", w, registry=r,
            multiprocess_mode="livesum",
        ).labels(self.worker)
        self.free = Gauge("haoyuan_inventory_free_units", "Free units (last availability read)",
                          [*w, "session"], registry=r, multiprocess_mode="liveall")
        self.capacity = Gauge("haoyuan_inventory_capacity_units",
                              "Capacity (last availability read)", [*w, "session"],
                              registry=r, multiprocess_mode="liveall")

        def lag(name: str, doc: str) -> Gauge:  # the same in every worker: max across
            return Gauge(name, doc, registry=r, multiprocess_mode="max")

        self.writer_pending = lag("haoyuan_writer_pending_entries",
                                  "Outbox entries delivered, not yet committed")
        self.writer_undelivered = lag("haoyuan_writer_undelivered_entries",
                                      "Outbox entries not yet read by the writer")
        self.dead_letters = lag("haoyuan_outbox_dead_letters", "Outbox dead letters")
        self.writer_age = lag("haoyuan_writer_oldest_pending_age_seconds",
                              "Age of the oldest pending outbox entry")
        self.stream_length = lag("haoyuan_outbox_stream_length", "Outbox stream length")
        self.his_pending = lag("haoyuan_his_pending_bookings", "Bookings not yet accepted by HIS")
        self.his_age = lag("haoyuan_his_oldest_pending_age_seconds",
                           "Age of the oldest booking not yet accepted by HIS")
        self.his_attention = Gauge("haoyuan_his_attention_bookings",
                                   "Bookings the HIS forwarder stopped retrying: an operator"
                                   " resolves them", ["state"], registry=r,
                                   multiprocess_mode="max")
        self.refund_orders = Gauge("haoyuan_refund_orders", "Refund orders not done, by state",
                                   ["state"], registry=r, multiprocess_mode="max")
        self.refund_age = lag("haoyuan_refund_oldest_open_age_seconds",
                              "Age of the oldest refund order not done")
        self.waiting_line = lag("haoyuan_waiting_room_waiting",
                                "Places in the waiting room's line not admitted yet")
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}

    def decision(self, op: str, outcome: str) -> None:
        key = ("d", op, outcome)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = self._decisions.labels(self.worker, op, outcome)
        c.inc()  # type: ignore[attr-defined]

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = ("r", route, method, str(status))
        h = self._children.get(key)
        if h is None:
            h = self._children[key] = self._requests.labels(self.worker, route, method, status)
        h.observe(seconds)  # type: ignore[attr-defined]

    def engine_call(self, op: str, seconds: float) -> None:
        key = ("e", op)
        h = self._children.get(key)
        if h is None:
            h = self._children[key] = self._engine.labels(self.worker, op)
        h.observe(seconds)  # type: ignore[attr-defined]

    def inventory(self, session_id: str, free: int, capacity: int) -> None:
        self.free.labels(self.worker, session_id).set(free)
        self.capacity.labels(self.worker, session_id).set(capacity)

    def render(self) -> bytes:
        """Every worker's series in multiprocess mode, else this worker's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            everyone = CollectorRegistry()
            MultiProcessCollector(everyone)  # type: ignore[no-untyped-call]
            return generate_latest(everyone)
        return generate_latest(self.registry)
