"""A fake I/O engine for fault tests: the engine's error, status and partial-restore
handling are reached through the IOEngine seam, without patching private functions.

    fake = FakeEngine(error=ChannelError("..."), at=2)
    migd_inproc.daemon.services.engine.io_engine = fake

Every transfer runs through the real engine (ThreadEngine) except the `at`-th (counting
from 1), which raises `error`, or, with `hang=True`, moves nothing and returns once the
job's cancel event is set. Like any engine it sets the cancel event on every exception.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from dataclasses import dataclass, field

from migd.io.engine import Counters, IOEngine, Transfer
from migd.io.threads import ThreadEngine

POLL = 0.01  # seconds between looks at the cancel event while hanging


@dataclass
class FakeEngine:
    error: BaseException | None = None  # raised by the `at`-th transfer
    hang: bool = False  # the `at`-th transfer waits for the cancel instead
    at: int = 1
    # Every real transfer without the blocks' populate hooks: the threads engine's
    # populator then maps nothing, and the channels meet unmapped memory themselves.
    idle_populator: bool = False
    real: IOEngine = field(default_factory=ThreadEngine)
    calls: int = 0  # transfers begun
    directions: list[str] = field(default_factory=list)  # of every transfer, in order
    hanging: bool = False  # the `at`-th transfer is waiting for the cancel now
    cancel_seen: bool = False  # the cancel event reached it while it was hanging

    async def run(self, transfer: Transfer) -> None:
        self.calls += 1
        self.directions.append(transfer.direction)
        if self.calls != self.at or (self.error is None and not self.hang):
            await self.real.run(self._edited(transfer))
            return
        transfer.counters.append(Counters())  # a channel that moves nothing
        try:
            if self.error is not None:
                # A copy, and no local name for it: an exception kept (here or in a frame
                # its traceback holds) would keep this frame's transfer, and with it views
                # of the backends' memory, alive after the job (object-del could not unmap).
                raise copy.copy(self.error)
            self.hanging = True
            while not transfer.cancel.is_set():
                await asyncio.sleep(POLL)
            self.cancel_seen = True
        except BaseException:
            transfer.cancel.set()  # the IOEngine contract
            raise
        finally:
            self.hanging = False

    def _edited(self, transfer: Transfer) -> Transfer:
        if not self.idle_populator:
            return transfer
        # The same counters list, memory views and bitmaps: only the hooks differ.
        blocks = [dataclasses.replace(b, populate=None) for b in transfer.blocks]
        return dataclasses.replace(transfer, blocks=blocks)
