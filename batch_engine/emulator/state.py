"""Everything one emulator knows, and the answers it computes: touched only from the server's event loop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from batch_engine.emulator.batches import OUTCOMES, Batch, BatchStore, RowFaults
from batch_engine.emulator.billing import Billed, BillingTotals
from batch_engine.emulator.caching import CachePlan, PromptCache
from batch_engine.emulator.catalog import MODELS, VERSION_2026_10_21, ModelRules
from batch_engine.emulator.clock import ScaledClock
from batch_engine.emulator.faults import FaultInjector
from batch_engine.emulator.params import MessageRequest, parse_request
from batch_engine.emulator.ratelimit import RateLimitBuckets
from batch_engine.emulator.replies import build_reply, message_json
from batch_engine.emulator.rows import PackedRows
from batch_engine.emulator.settings import EmulatorSettings
from batch_engine.emulator.stats import Stats
from batch_engine.emulator.wire import ApiFailure, error_body, new_id, rfc3339
from batch_engine.errors import ConfigError
from batch_engine.files import atomic_write_bytes, loads, read_bytes

SNAPSHOT_VERSION = 1
# "All usage is charged at 50% of the standard API prices" (docs: /build-with-claude/batch-processing).
BATCH_DISCOUNT = 0.5
logger = logging.getLogger(__name__)


# Built per request: read-only by `Final` fields, not `frozen=True` (see `Segment` in params.py).
@dataclass(slots=True)
class Prepared:
    """A validated Messages request and what it would read from / write to the cache."""

    request: Final[MessageRequest]
    plan: Final[CachePlan]

    @property
    def rate_limited_input(self) -> int:
        # Cache reads do not count toward ITPM; fresh input and cache writes do.
        return self.request.total_tokens - self.plan.read_tokens


class EmulatorState:
    """Settings, clock, cache, limits, faults, batches and counters of one running emulator."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.initial_settings = settings
        self.settings = settings
        self.wake = asyncio.Event()
        self.dirty = False
        self._fresh(settings)
        if settings.state_file is not None and settings.state_file.exists():
            try:
                self.restore(loads(read_bytes(settings.state_file)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{settings.state_file}: not a usable emulator state file ({exc})") from exc

    def _fresh(self, settings: EmulatorSettings) -> None:
        self.models: Mapping[str, ModelRules] = MODELS
        self.clock = ScaledClock(settings.time_scale)
        self.cache = PromptCache()
        self.limiter = RateLimitBuckets(settings)
        self.faults = FaultInjector(settings.seed)
        self.batches = BatchStore()
        self.stats = Stats()
        self.billing = BillingTotals()
        self.latency_rng = random.Random(settings.seed)
        self.output_rng = random.Random(f"{settings.seed}:invalid-output")

    def reset(self) -> None:
        """Forget everything and return to the settings the emulator started with."""
        self.settings = self.initial_settings
        self._fresh(self.settings)
        self.dirty = True

    def configure(self, changes: Mapping[str, Any]) -> EmulatorSettings:
        """Change settings at run time; raises pydantic.ValidationError on a bad value."""
        old = self.settings
        new = EmulatorSettings.model_validate({**old.model_dump(), **changes})
        self.settings = new
        if new.time_scale != old.time_scale:
            self.clock.set_scale(new.time_scale)
        if (new.rpm, new.itpm, new.otpm, new.batch_rpm, new.count_tokens_rpm) != (
            old.rpm,
            old.itpm,
            old.otpm,
            old.batch_rpm,
            old.count_tokens_rpm,
        ):
            self.limiter.reconfigure(new)
        if new.seed != old.seed:
            self.faults = FaultInjector(new.seed)
            self.latency_rng = random.Random(new.seed)
            self.output_rng = random.Random(f"{new.seed}:invalid-output")
        return new

    # --- Messages -------------------------------------------------------------------------------------------

    def prepare_message(
        self, params: Any, *, counting: bool = False, api_version: str = VERSION_2026_10_21
    ) -> Prepared:
        request = parse_request(params, self.models, counting=counting, api_version=api_version)
        if counting:
            return Prepared(request, CachePlan())
        plan = self.cache.plan(request.model, request.segments, request.spec.min_cacheable_tokens, self.clock.now())
        return Prepared(request, plan)

    def answer(self, prepared: Prepared, *, custom_id: str | None, lane: str) -> tuple[dict[str, Any], Billed]:
        """Commit the cache plan, build the reply and bill it."""
        request = prepared.request
        self.cache.commit(prepared.plan, self.clock.now())
        rate = self.settings.invalid_output_rate
        json_answer = request.json_schema is not None or request.forced_tool is not None
        broken = json_answer and rate > 0 and self.output_rng.random() < rate
        reply = build_reply(
            request,
            custom_id=custom_id,
            reply_tokens=self.settings.reply_tokens,
            invalid_output=broken,
            refuse=self._drawn(self.settings.refusal_rate, "refusal", request, custom_id),
            pause=request.server_tool is not None
            and self._drawn(self.settings.pause_turn_rate, "pause_turn", request, custom_id),
        )
        billed = Billed.of(request.total_tokens, prepared.plan, reply.output_tokens, reply.thinking_tokens)
        discount = BATCH_DISCOUNT if lane == "batch" else 1.0
        self.billing.add(lane, billed, billed.cost_usd(request.spec, discount))
        tier = "batch" if lane == "batch" else "standard"
        self.dirty = True
        return message_json(request, reply, billed.usage_json(tier)), billed

    def _drawn(self, rate: float, what: str, request: MessageRequest, custom_id: str | None) -> bool:
        if not rate:
            return False
        # A hash of the request, not a shared RNG: the same prompt is refused (or paused) again, whatever the timing.
        key = f"{self.settings.seed}:{what}:{custom_id}:{request.model}:{request.last_user_text}"
        draw = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
        return draw < rate

    # --- Batches --------------------------------------------------------------------------------------------

    def create_batch(self, custom_ids: list[str], rows: PackedRows, api_version: str = VERSION_2026_10_21) -> Batch:
        settings = self.settings
        faults = RowFaults(
            settings.batch_row_error_rate,
            settings.batch_row_error_type,
            settings.batch_row_expire_rate,
            settings.batch_never_ends,
        )
        batch = self.batches.create(custom_ids, rows, self.clock.now(), settings.batch_duration_s, faults, api_version)
        self.stats.record_batch(custom_ids)
        self.dirty = True
        self.wake.set()
        return batch

    def queue_room(self, requests: int) -> float | None:
        """None when `requests` more fit the batch processing queue, else seconds until room may open.

        Batch limits cover the requests waiting in the processing queue across all batches (Start 200k, Build
        300k, Scale 500k); a create over it is refused with a 429 (docs: /api/rate-limits, Message Batches).
        """
        cap = self.settings.batch_queue_cap
        if cap is None:
            return None
        active = self.batches.active()
        waiting = sum(batch.size - batch.next_row for batch in active)
        if waiting + requests <= cap:
            return None
        now = self.clock.now()
        soonest = min((batch.created_at + batch.duration_s - now for batch in active), default=0.0)
        return max(0.0, soonest) / self.clock.time_scale

    def touch(self, batch: Batch) -> None:
        """Bring a batch's status up to date with the clock (expiry, cancellation, end) without new rows."""
        if batch.status == "ended":
            return
        batch.advance(self.clock.now(), self._answer_row, 0, self.settings.seed)
        if batch.status == "ended":
            self.dirty = True

    def cancel_batch(self, batch: Batch) -> None:
        self.touch(batch)
        if batch.status == "in_progress":
            batch.status = "canceling"
            batch.cancel_initiated_at = self.clock.now()
            self.dirty = True
            self.wake.set()

    def delete_batch(self, batch_id: str) -> None:
        batch = self.batches.get(batch_id)
        self.touch(batch)
        self.batches.delete(batch_id)
        for outcome in OUTCOMES:
            self.stats.deleted_batch_rows[outcome] += batch.counts[outcome]
        self.dirty = True

    def process_batches(self, budget: int) -> int:
        """Answer up to `budget` due rows across active batches; return how many were answered."""
        done = 0
        now = self.clock.now()
        for batch in self.batches.active():
            status = batch.status
            done += batch.advance(now, self._answer_row, budget - done, self.settings.seed)
            if batch.status != status:
                self.dirty = True
            if done >= budget:
                break
        return done

    def has_active_batches(self) -> bool:
        return any(batch.status != "ended" for batch in self.batches.all())

    def _answer_row(self, batch: Batch, index: int) -> tuple[bytes, str]:
        assert batch.rows is not None
        custom_id = batch.custom_ids[index]
        params = batch.rows.take(index)
        self.stats.batch_rows_processed += 1
        self.dirty = True
        fate = self._row_fate(batch, index)
        if fate == "expired":
            return orjson.dumps({"custom_id": custom_id, "result": {"type": "expired"}}), "expired"
        if fate == "errored":
            failure = ApiFailure(batch.faults.error_type, "Injected by the emulator: this row failed.")
            return self._errored(custom_id, failure), "errored"
        try:
            # Rows are validated as the create request's API version says (checked only when processed).
            request = parse_request(params, self.models, api_version=batch.api_version)
            # A row whose draw says miss is planned as a miss from the start (the same plan as a hit turned miss).
            may_hit = self._batch_cache_hits(batch, index)
            minimum, now = request.spec.min_cacheable_tokens, self.clock.now()
            plan = self.cache.plan(request.model, request.segments, minimum, now, may_hit=may_hit)
            message, _ = self.answer(Prepared(request, plan), custom_id=custom_id, lane="batch")
        except ApiFailure as failure:
            return self._errored(custom_id, failure), "errored"
        except Exception:
            logger.exception("emulator: unexpected error answering batch row %s", custom_id)
            return self._errored(custom_id, ApiFailure("api_error", "Internal server error")), "errored"
        self.stats.record_row_success(custom_id)
        result = {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}
        return orjson.dumps(result), "succeeded"

    @staticmethod
    def _errored(custom_id: str, failure: ApiFailure) -> bytes:
        error = error_body(failure.error_type, failure.message, new_id("req_"))
        return orjson.dumps({"custom_id": custom_id, "result": {"type": "errored", "error": error}})

    def _batch_cache_hits(self, batch: Batch, index: int) -> bool:
        rate = self.settings.batch_cache_hit_rate
        if rate >= 1:
            return True
        # By custom_id, not batch id: the same workload hits and misses alike on every run.
        key = f"cache:{self.settings.seed}:{batch.custom_ids[index]}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < rate

    def _row_fate(self, batch: Batch, index: int) -> str | None:
        faults = batch.faults
        if not (faults.error_rate or faults.expire_rate):
            return None
        # A hash of (seed, batch, row) rather than a shared RNG: the fate of a row does not depend on timing.
        digest = hashlib.blake2b(f"{self.settings.seed}:{batch.id}:{index}".encode(), digest_size=8).digest()
        draw = int.from_bytes(digest, "big") / 2**64
        if draw < faults.error_rate:
            return "errored"
        if draw < faults.error_rate + faults.expire_rate:
            return "expired"
        return None

    # --- Introspection and persistence ----------------------------------------------------------------------

    def stats_json(self) -> dict[str, Any]:
        rows = dict(self.stats.deleted_batch_rows)
        statuses = {"in_progress": 0, "canceling": 0, "ended": 0}
        for batch in self.batches.all():
            statuses[batch.status] += 1
            for outcome in OUTCOMES:
                rows[outcome] += batch.counts[outcome]
        totals = self.billing.totals()
        return {
            **self.stats.to_json(),
            "batch_rows": rows,
            "batches": statuses,
            "tokens_billed": totals,
            "tokens_billed_by_lane": self.billing.tokens,
            "cost_usd": {
                **self.billing.cost,
                "total": self.billing.cost["realtime"] + self.billing.cost["batch"],
            },
            "faults_injected": dict(self.faults.injected),
            "pending_faults": self.faults.pending(),
            "cache": {"entries": len(self.cache), "hits": self.cache.hits, "writes": self.cache.writes},
            "clock": {"now": rfc3339(self.clock.now()), "time_scale": self.clock.time_scale},
            "settings": self.settings.public(),
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "clock_now": self.clock.now(),
            "batches": [batch.snapshot() for batch in self.batches.all()],
            "cache": self.cache.snapshot(),
            "stats": self.stats.snapshot(),
            "ledger": self.billing.snapshot(),  # the key of SNAPSHOT_VERSION 1 files, kept so they still load
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Continue from a snapshot; the clock resumes where it stopped, or at wall time if that is later."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"emulator state file has version {data.get('version')!r}, expected {SNAPSHOT_VERSION}")
        start = max(float(data["clock_now"]), ScaledClock().now())
        self.clock = ScaledClock(self.settings.time_scale, start=start)
        self.batches = BatchStore()
        for batch in data["batches"]:
            self.batches.add(Batch.restore(batch))
        self.cache.restore(data["cache"])
        self.stats.restore(data["stats"])
        self.billing.restore(data["ledger"])

    def save(self) -> bytes:
        """Serialize now (on the loop thread); the caller writes the bytes with `write_state`."""
        self.dirty = False
        return orjson.dumps(self.snapshot())


def write_state(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
