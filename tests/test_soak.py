"""The fault soak, small: 1,000 tasks against an emulator process injecting 429 (retry-after), 529, 500 and dropped
connections on every endpoint plus errored and expired batch rows (`python -m batch_engine.soak` at 10,000)."""

from __future__ import annotations

from batch_engine.soak import soak


def test_every_task_is_accounted_for_and_no_success_is_billed_twice_under_faults() -> None:
    result = soak(1000, chunk_size=300, batch_duration_s=1.0)

    assert result.accounted_for == result.tasks == 1000
    # Every injected fault is retryable: every task ends succeeded.
    assert result.succeeded == 1000, result.by_status
    assert sum(result.faults_injected.values()) > 0
    # One batch per chunk and per resubmission round; no custom_id billed as succeeded twice.
    assert result.duplicate_batch_payloads == 0
    assert result.duplicate_batch_successes == 0
    # A realtime request is only billed twice when the API answered and the connection dropped before the
    # answer arrived (the Messages API has no idempotency key): never more often than that happened.
    assert result.realtime_rebilled <= result.dropped_realtime_responses
    assert result.engine_peak_rss_mib < 1024
