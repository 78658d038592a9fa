"""Prometheus text metrics kept in process: counts and latencies by route, status, model and provider.

Labels are drawn from closed sets (routes, statuses, model names from the registry): never an account
id, a key, or anything a client wrote.
"""

from __future__ import annotations

from collections import defaultdict

__all__ = ["Metrics"]

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in pairs)
    return "{" + inner + "}"


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(_LATENCY_BUCKETS_S)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, edge in enumerate(_LATENCY_BUCKETS_S):
            if value <= edge:
                self.buckets[i] += 1
                break


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.tokens: defaultdict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.charges: defaultdict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.upstream_latency: defaultdict[tuple[tuple[str, str], ...], _Histogram] = defaultdict(_Histogram)
        self.ttfb: defaultdict[tuple[tuple[str, str], ...], _Histogram] = defaultdict(_Histogram)
        self.active_streams = 0
        # The settlement path (issue 12): retried, spooled to disk, replayed from it, and the live
        # streams of a dead process settled from its last progress note.
        self.settle_retries = 0
        self.spooled = 0
        self.replayed = 0
        self.interrupted = 0
        self.spool_pending = 0
        self.auth_failures: defaultdict[tuple[tuple[str, str], ...], int] = defaultdict(int)

    def request(self, route: str, status: int) -> None:
        self.requests[(("route", route), ("status", str(status)))] += 1

    def auth_failure(self, outcome: str) -> None:
        """outcome: rejected (a 401, counted toward the throttle) or throttled (a 429 instead)."""
        self.auth_failures[(("outcome", outcome),)] += 1

    def upstream(self, provider: str, first_byte_s: float, total_s: float) -> None:
        self.ttfb[(("provider", provider),)].observe(first_byte_s)
        self.upstream_latency[(("provider", provider),)].observe(total_s)

    def usage(self, model: str, hit: int, miss: int, out: int, charge_micro: int) -> None:
        self.tokens[(("model", model), ("kind", "input_cache_hit"))] += hit
        self.tokens[(("model", model), ("kind", "input_cache_miss"))] += miss
        self.tokens[(("model", model), ("kind", "output"))] += out
        self.charges[(("model", model),)] += charge_micro

    def render(self) -> str:
        out: list[str] = []

        def counter(name: str, help_: str, series: dict[tuple[tuple[str, str], ...], int]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} counter")
            for labels, value in sorted(series.items()):
                out.append(f"{name}{_labels(labels)} {value}")

        def histogram(name: str, help_: str, series: dict[tuple[tuple[str, str], ...], _Histogram]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            for labels, h in sorted(series.items()):
                running = 0
                for edge, n in zip(_LATENCY_BUCKETS_S, h.buckets, strict=True):
                    running += n
                    out.append(f"{name}_bucket{_labels((*labels, ('le', repr(edge))))} {running}")
                out.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {h.count}")
                out.append(f"{name}_sum{_labels(labels)} {h.sum:.6f}")
                out.append(f"{name}_count{_labels(labels)} {h.count}")

        counter("gateway_requests_total", "Requests by route and status code.", self.requests)
        histogram("gateway_upstream_first_byte_seconds", "Upstream time to first byte.", self.ttfb)
        histogram("gateway_upstream_seconds", "Upstream request duration.", self.upstream_latency)
        out.append("# HELP gateway_active_streams Streams being relayed now.")
        out.append("# TYPE gateway_active_streams gauge")
        out.append(f"gateway_active_streams {self.active_streams}")
        counter("gateway_tokens_total", "Tokens billed by model and kind.", self.tokens)
        counter("gateway_charge_micro_total", "Credit charged by model, in micro-units.", self.charges)
        for name, kind, help_, value in (
            ("gateway_settle_retries_total", "counter", "Settlement attempts retried after a Redis error.", self.settle_retries),
            ("gateway_settlements_spooled_total", "counter", "Settlements written to the local spool.", self.spooled),
            ("gateway_settlements_replayed_total", "counter", "Spooled settlements applied to the ledger.", self.replayed),
            ("gateway_streams_interrupted_total", "counter", "Streams of dead processes settled from their progress note.", self.interrupted),
            ("gateway_spool_pending", "gauge", "Settlements in this process's spool, waiting for the ledger.", self.spool_pending),
        ):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        counter(
            "gateway_auth_failures_total",
            "Failed API key authentications: rejected (401) and throttled (429, too many per address).",
            self.auth_failures,
        )
        return "\n".join(out) + "\n"
