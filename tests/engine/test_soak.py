"""The fault soak, small: 1,000 tasks against an emulator process injecting 429 (retry-after), 529, 500 and dropped
connections on every endpoint, batch creates and Messages calls that fail after doing their work, plus errored and
expired batch rows (`python -m batch_engine.bench.soak` at 10,000), on each state backend (SQLite files, a
PostgreSQL database)."""

from __future__ import annotations

from batch_engine.bench.soak import soak


def test_every_task_is_accounted_for_and_no_success_is_billed_twice_under_faults(state_url: str) -> None:
    result = soak(1000, chunk_size=300, batch_duration_s=1.0, state_url=state_url)

    assert result.accounted_for == result.tasks == 1000
    # Every injected fault is retryable: every task ends succeeded.
    assert result.succeeded == 1000, result.by_status
    assert sum(result.faults_injected.values()) > 0
    # One batch per chunk and per resubmission round; no custom_id billed as succeeded twice.
    assert result.duplicate_batch_payloads == result.whole_chunk_resubmissions
    assert result.duplicate_batch_successes == 0
    # A realtime request is only billed twice when the API answered and the connection dropped before the
    # answer arrived (the Messages API has no idempotency key): never more often than that happened.
    assert result.realtime_rebilled <= result.unanswered_messages
    # A create that failed after the batch was made was adopted: every batch the API holds is in the ledger.
    assert result.faults_injected.get("after_commit", 0) > 0
    assert result.batches_not_in_ledger == 0
    # The usage log is what was billed, to the cent: every batch row once; every realtime answer that arrived.
    assert abs(result.usage_log_batch_usd - result.billed_batch_usd) < 0.005
    assert abs(result.usage_log_usd - (result.billed_usd - result.unanswered_usd)) < 0.005
    assert result.engine_peak_rss_mib < 1024
