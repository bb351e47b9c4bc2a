"""One process per run: the lease on a run in the ledger (owner, host, pid, heartbeat, expiry).

A second process on a live run is refused with `RunBusyError`; a lease whose owner is gone (its pid is dead on
this host, or its heartbeat expired) is taken over. The heartbeat runs on the event loop while the lanes work.

A process whose lease was taken over (it was suspended, or its host lost the ledger's disk, for longer than the
lease lasts) stops: the heartbeat that finds the lease gone cancels the work with `LeaseLostError`, and every
batch create and realtime request first checks that the lease is still this process's (`check`), so a process
that wakes up after a take-over sends nothing more, even before its next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from batch_engine.errors import LeaseLostError, RunBusyError
from batch_engine.files import pid_alive
from batch_engine.state.backend import RunLedger
from batch_engine.state.ledger import Lease

# Long enough that a loop busy writing a large output does not lose the lease; a dead process on this host is
# taken over at once (by its pid), so only a process on another host waits this long after a crash.
LEASE_TTL_S = 600.0
HEARTBEAT_S = 30.0


def holder_alive(lease: Lease, now: float | None = None) -> bool:
    """Whether the lease's owner may still be working: heartbeat not expired and, on this host, its pid alive."""
    if lease.expires_at <= (time.time() if now is None else now):
        return False
    return lease.host != socket.gethostname() or pid_alive(lease.pid)


@dataclass
class RunLease:
    """This process's lease on one run."""

    ledger: RunLedger
    run_key: str
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    def take(self) -> None:
        """Take the lease, or raise `RunBusyError` naming the live process that holds it."""
        now = time.time()
        mine = Lease(self.run_key, self.owner, socket.gethostname(), os.getpid(), now, now + LEASE_TTL_S)
        held = self.ledger.take_lease(mine, holder_alive)
        if held is not None:
            raise RunBusyError(
                f"run {self.run_key} is being worked on by pid {held.pid} on {held.host} (heartbeat "
                f"{max(0.0, now - held.heartbeat_at):.0f}s ago); two processes on one run would both send "
                "everything: wait for it to finish, or stop it (a lease whose process is gone is taken over)"
            )

    def renew(self) -> bool:
        now = time.time()
        return self.ledger.renew_lease(self.run_key, self.owner, now, now + LEASE_TTL_S)

    def check(self) -> None:
        """Raise `LeaseLostError` unless this process still holds the lease (one indexed read: cheap next to the
        request it guards)."""
        holder = self.ledger.lease(self.run_key)
        if holder is None or holder.owner != self.owner:
            taken = f" by pid {holder.pid} on {holder.host}" if holder is not None else ""
            raise LeaseLostError(
                f"run {self.run_key}: this process's lease was taken over{taken} (its heartbeat had expired), so "
                "it stopped sending; the process holding the lease now finishes the run"
            )

    def release(self) -> None:
        self.ledger.release_lease(self.run_key, self.owner)

    @contextlib.asynccontextmanager
    async def heartbeat(self, every_s: float | None = None) -> AsyncIterator[None]:
        """Renew the lease every `every_s` while the block runs; a renewal that finds the lease taken over cancels
        the block, which then raises `LeaseLostError`."""
        worker = asyncio.current_task()
        lost = False

        async def beat() -> None:
            nonlocal lost
            while True:
                await asyncio.sleep(HEARTBEAT_S if every_s is None else every_s)
                if not self.renew():
                    lost = True
                    if worker is not None:
                        worker.cancel()
                    return

        ticker = asyncio.create_task(beat())
        try:
            yield
        except asyncio.CancelledError:
            if not lost:
                raise
            if worker is not None:
                worker.uncancel()
            self.check()  # raises LeaseLostError, naming who holds the lease now
            raise
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


def abandoned_leases(ledger: RunLedger, input_path: str) -> list[Lease]:
    """The leases on unfinished runs of `input_path` whose holder is gone: a worker that died mid-run (its process
    killed, its machine lost). On PostgreSQL that shows at once (its database session ends); on SQLite by its pid
    on this host, else when its heartbeat expires."""
    found = []
    for record in ledger.runs():
        if record.status in ("running", "submitted") and record.input_path == input_path:
            lease = ledger.lease(record.run_key)
            if lease is not None and not ledger.lease_alive(lease, holder_alive):
                found.append(lease)
    return found
