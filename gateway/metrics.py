"""Prometheus metrics of this process (``/metrics``); scrape every replica.

Counted where it happens, cheaply: messages in when stored, messages out when the hub hands
them to local subscribers (one count per subscriber: sockets for the web, the room's relay
for MQTT and Telegram), refusals by code, and what was dropped or skipped by reason.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_IN = Counter(
    "gateway_messages_in_total", "Messages stored, by the sender's protocol", ["protocol"]
)
MESSAGES_OUT = Counter(
    "gateway_messages_out_total",
    "Room messages handed to local subscribers, by the subscriber's protocol",
    ["protocol"],
)
ERRORS = Counter(
    "gateway_errors_total", "Refused input, by protocol and error code", ["protocol", "code"]
)
DROPPED = Counter(
    "gateway_dropped_total",
    "Messages dropped or skipped (recoverable from history), by protocol and reason",
    ["protocol", "reason"],
)
RELAY_DELIVERED = Counter(
    "gateway_relay_delivered_total",
    "Log entries the relay delivered to outbound targets, by role", ["role"],
)
RELAY_SKIPPED = Counter(
    "gateway_relay_skipped_total",
    "Log entries the relay skipped for targets too far behind (its backlog), by role",
    ["role"],
)
RELAY_RETRIES = Counter(
    "gateway_relay_retries_total", "Relay deliveries that failed and are retried, by role",
    ["role"],
)
WEBHOOK_DELIVERIES = Counter(
    "gateway_webhook_deliveries_total",
    "Webhook delivery attempts, by result (ok, error_status, timeout, unreachable)",
    ["result"],
)
WEBHOOK_LATENCY = Histogram(
    "gateway_webhook_latency_seconds", "How long webhook receivers took to answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RETENTION_PRUNED = Counter(
    "gateway_retention_pruned_total", "Log entries (messages and others) removed by retention",
)
CONNECTIONS = Gauge(
    "gateway_connections", "Open scopes of this process, by protocol", ["protocol"]
)
BROADCAST_LATENCY = Histogram(
    "gateway_broadcast_latency_seconds",
    "From a message being stored to its delivery by this process's hub",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def refused(protocol: str, code: str) -> None:
    ERRORS.labels(protocol, code).inc()


def dropped(protocol: str, reason: str, count: int = 1) -> None:
    DROPPED.labels(protocol, reason).inc(count)
