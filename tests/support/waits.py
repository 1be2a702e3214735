"""Bounded waits for what happens in the background: `eventually` (until a condition
holds) and `poll` (until an awaited probe's result does, with the time it took). Each
gives up after its bound and leaves the assertion to the caller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> bool:
    """Poll `predicate` every 10 ms for up to `within` seconds (pub/sub is asynchronous)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def poll(probe, until, within: float, every: float = 0.01) -> tuple[Any, float]:
    """Call `probe()` every `every` s until `until(result)`; (last result, seconds taken).
    Gives up after `within` seconds (the caller asserts on the result)."""
    start = time.monotonic()
    while True:
        result = await probe()
        elapsed = time.monotonic() - start
        if until(result) or elapsed > within:
            return result, elapsed
        await asyncio.sleep(every)
