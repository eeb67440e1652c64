"""Plots of a release morning: throughput, latency and inventory over the
spike, and writer/HIS lag. Needs matplotlib (the ``load`` extra)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(timeline: list[tuple[float, str, str, float]], series: list[dict[str, Any]],
         release_t: float, out: Path, history: list[dict[str, float]] | None = None
         ) -> list[str]:
    paths: list[str] = []
    if history:
        t0 = history[0]["t"]
        xs = [h["t"] - t0 for h in history]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.plot(xs, [h["rps"] for h in history], label="requests/s")
        ax.plot(xs, [h["fail_s"] for h in history], label="failures/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [h["users"] for h in history], color="grey", linestyle=":",
                 label="users")
        ax.set_xlabel("seconds (Locust clock)")
        ax.set_title("HTTP throughput over the spike (Locust)")
        ax.legend(loc="upper left")
        paths.append(_save(fig, out / "throughput.png"))
        fig, ax = plt.subplots(figsize=(9, 4))
        for k in ("p50", "p95", "p99"):
            ax.plot(xs, [max(h[k], 0.1) for h in history], label=k)
        ax.set_yscale("log")
        ax.set_xlabel("seconds (Locust clock)")
        ax.set_ylabel("latency ms")
        ax.set_title("HTTP latency over the spike (Locust, cumulative percentiles)")
        ax.legend()
        paths.append(_save(fig, out / "latency.png"))
        timeline = []
    if timeline:
        end = int(max(t for t, *_ in timeline)) + 1
        buckets: dict[str, Counter[int]] = {}
        for t, op, outcome, _ms in timeline:
            key = f"{op} {outcome}" if op == "hold" else op
            buckets.setdefault(key, Counter())[int(t * 4)] += 1
        fig, ax = plt.subplots(figsize=(9, 4))
        xs = [i / 4 for i in range(end * 4)]
        for key, c in sorted(buckets.items()):
            ax.plot(xs, [c.get(i, 0) * 4 for i in range(end * 4)], label=key, linewidth=1)
        ax.axvline(release_t, color="k", linestyle="--", linewidth=0.8, label="release")
        ax.set_xlabel("seconds")
        ax.set_ylabel("decisions / s")
        ax.set_title("Throughput by operation and outcome")
        ax.legend(fontsize=7, ncol=2)
        paths.append(_save(fig, out / "throughput.png"))

        fig, ax = plt.subplots(figsize=(9, 4))
        per_sec: dict[int, list[float]] = {}
        for t, _op, _o, ms in timeline:
            per_sec.setdefault(int(t), []).append(ms)
        secs = sorted(per_sec)
        for q, label in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            ys = [sorted(per_sec[s])[min(len(per_sec[s]) - 1, int(q * len(per_sec[s])))]
                  for s in secs]
            ax.plot(secs, ys, label=label)
        ax.axvline(release_t, color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency ms")
        ax.set_yscale("log")
        ax.set_title("Latency per second")
        ax.legend()
        paths.append(_save(fig, out / "latency.png"))
    if series:
        ts = [p["t"] for p in series]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.plot(ts, [p["free"] for p in series], label="free units")
        ax.plot(ts, [p["writer_pending"] for p in series], label="outbox not yet in PostgreSQL")
        ax.plot(ts, [p["his_pending"] for p in series], label="bookings not yet in HIS")
        ax.axvline(release_t, color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("seconds")
        ax.set_title("Inventory and lag")
        ax.legend()
        paths.append(_save(fig, out / "inventory_lag.png"))
    return paths


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
