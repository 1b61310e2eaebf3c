"""Counters and latency samples the engine keeps for /metrics; plain Python, no metrics
library (the API layer turns a snapshot into Prometheus families)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    tokens_generated: int = 0
    prefix_hits: int = 0  # admissions that took cached positions instead of computing them
    prefix_tokens: int = 0  # positions so taken
    preemptions: int = 0
    evictions: int = 0
    # adapter figures of models already unloaded (their workers' own counts went with them)
    adapter_loads: int = 0
    adapter_device_evictions: int = 0
    adapter_host_evictions: int = 0
    finished: Counter[str] = field(default_factory=Counter)  # by finish reason
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=1_000_000))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def drain(self) -> tuple[list[float], list[float]]:
        """Latency samples since the last scrape (time to first token, inter-token)."""
        with self.lock:
            ttft, itl = list(self.ttft), list(self.itl)
            self.ttft.clear()
            self.itl.clear()
        return ttft, itl
