"""Introspection counters: calls per endpoint and status, batch rows, duplicates, rate limiting."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from batch_engine.emulator.batches import OUTCOMES


class Stats:
    """Counters a test or benchmark reads through `GET /_emulator/stats`."""

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, int]] = {}
        self.messages_succeeded = 0
        self.rate_limited = 0
        self.batches_created = 0
        self.batch_rows_created = 0
        self.batch_rows_processed = 0
        self.deleted_batch_rows = dict.fromkeys(OUTCOMES, 0)
        # custom_id → number of created batches that carried it / number of succeeded results it got.
        self.custom_id_batches: dict[str, int] = {}
        self.custom_id_successes: dict[str, int] = {}
        self.duplicate_custom_ids = 0
        self.duplicate_successes = 0
        self.duplicate_batch_payloads = 0
        self._payloads: set[bytes] = set()
        self.repeated_realtime_requests = 0
        self._realtime_bodies: set[bytes] = set()
        # Wall-clock time the first API request arrived (a start-up benchmark measures a client's launch to it).
        self.first_request_at: float | None = None
        # Messages billed whose answer never reached the client (a dropped connection, an error after the work,
        # a stream's error event): billed, yet no client can have logged them.
        self.unanswered_messages = 0
        self.unanswered_usd = 0.0

    def record_arrival(self) -> None:
        if self.first_request_at is None:
            self.first_request_at = time.time()

    def record_call(self, endpoint: str, status: str) -> None:
        by_status = self.calls.setdefault(endpoint, {})
        by_status[status] = by_status.get(status, 0) + 1
        if status == "429":
            self.rate_limited += 1

    def record_batch(self, custom_ids: list[str]) -> None:
        self.batches_created += 1
        self.batch_rows_created += len(custom_ids)
        for custom_id in custom_ids:
            seen = self.custom_id_batches.get(custom_id, 0)
            if seen == 1:
                self.duplicate_custom_ids += 1
            self.custom_id_batches[custom_id] = seen + 1
        # The same chunk submitted twice shows up as an identical set of custom_ids.
        payload = hashlib.blake2b("\n".join(sorted(custom_ids)).encode(), digest_size=16).digest()
        if payload in self._payloads:
            self.duplicate_batch_payloads += 1
        self._payloads.add(payload)

    def record_row_success(self, custom_id: str) -> None:
        seen = self.custom_id_successes.get(custom_id, 0)
        if seen == 1:
            self.duplicate_successes += 1
        self.custom_id_successes[custom_id] = seen + 1

    def record_realtime_success(self, body: bytes | bytearray) -> None:
        self.messages_succeeded += 1
        digest = hashlib.blake2b(body, digest_size=16).digest()
        if digest in self._realtime_bodies:
            self.repeated_realtime_requests += 1
        self._realtime_bodies.add(digest)

    def record_unanswered(self, cost_usd: float) -> None:
        self.unanswered_messages += 1
        self.unanswered_usd += cost_usd

    def to_json(self) -> dict[str, Any]:
        return {
            "unanswered_messages": self.unanswered_messages,
            "unanswered_cost_usd": self.unanswered_usd,
            "calls": {endpoint: dict(by_status) for endpoint, by_status in self.calls.items()},
            "messages_succeeded": self.messages_succeeded,
            "repeated_realtime_requests": self.repeated_realtime_requests,
            "rate_limited": self.rate_limited,
            "batches_created": self.batches_created,
            "batch_rows_created": self.batch_rows_created,
            "batch_rows_processed": self.batch_rows_processed,
            "duplicate_custom_ids_across_batches": self.duplicate_custom_ids,
            "duplicate_succeeded_custom_ids": self.duplicate_successes,
            "duplicate_batch_payloads": self.duplicate_batch_payloads,
            "first_request_at": self.first_request_at,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.to_json(),
            "deleted_batch_rows": self.deleted_batch_rows,
            "custom_id_batches": self.custom_id_batches,
            "custom_id_successes": self.custom_id_successes,
            "payloads": [payload.hex() for payload in self._payloads],
            "realtime_bodies": [digest.hex() for digest in self._realtime_bodies],
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.calls = data["calls"]
        self.messages_succeeded = data["messages_succeeded"]
        self.repeated_realtime_requests = data["repeated_realtime_requests"]
        self.rate_limited = data["rate_limited"]
        self.batches_created = data["batches_created"]
        self.batch_rows_created = data["batch_rows_created"]
        self.batch_rows_processed = data["batch_rows_processed"]
        self.duplicate_custom_ids = data["duplicate_custom_ids_across_batches"]
        self.duplicate_successes = data["duplicate_succeeded_custom_ids"]
        self.duplicate_batch_payloads = data["duplicate_batch_payloads"]
        self.unanswered_messages = data.get("unanswered_messages", 0)
        self.unanswered_usd = data.get("unanswered_cost_usd", 0.0)
        self.deleted_batch_rows = data["deleted_batch_rows"]
        self.first_request_at = data.get("first_request_at")
        self.custom_id_batches = data["custom_id_batches"]
        self.custom_id_successes = data["custom_id_successes"]
        self._payloads = {bytes.fromhex(payload) for payload in data["payloads"]}
        self._realtime_bodies = {bytes.fromhex(digest) for digest in data["realtime_bodies"]}
