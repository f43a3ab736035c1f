"""``SELECT 1`` round trips, timed: what a link to Postgres adds, run from where the client is.

``python -m benchmarks.rtt DSN [N]`` prints the median and 99th percentile
of N round trips (default 1000, after 50 unmeasured) in milliseconds, as JSON.
benchmarks/multihost.py runs it inside a host's network namespace.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import asyncpg

WARM_UP = 50


async def measure(dsn: str, n: int) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        times = []
        for i in range(WARM_UP + n):
            start = time.perf_counter()
            await conn.fetchval("SELECT 1")
            if i >= WARM_UP:
                times.append((time.perf_counter() - start) * 1000)
    finally:
        await conn.close()
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
    }


if __name__ == "__main__":
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    print(json.dumps(asyncio.run(measure(sys.argv[1], count))))
