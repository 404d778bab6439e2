"""Prometheus metrics of the stand-in server (``corral_server_*``)."""

from __future__ import annotations

from agents.metrics import counter, gauge, histogram

__all__ = ["CALLS", "CALL_SECONDS", "EVENTS_SENT", "FAULTS", "HTTP", "REPLIES", "REVISION", "SERVICE_EVENTS",
           "SUBSCRIBERS"]

HTTP = counter("server", "http_requests", "API requests by status", ["status"])
EVENTS_SENT = counter("server", "events_sent", "event frames written to subscribers (pings excluded)")
SUBSCRIBERS = gauge("server", "subscribers", "open websocket subscriptions")
CALLS = counter("server", "calls", "request/reply calls by outcome", ["name", "status"])
CALL_SECONDS = histogram("server", "call_seconds", "call() latency until the reply or the last timeout",
                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60))
REPLIES = counter("server", "replies", "replies published by agents by status", ["status"])
SERVICE_EVENTS = counter("server", "service_events", "health reports by outcome", ["status"])
REVISION = gauge("server", "revision", "current global revision")
FAULTS = counter("server", "faults", "faults added by type", ["type"])
