"""The one error tree of batch_engine.

    BatchEngineError                  anything the engine reports as one clean line (CLI exit 2 unless noted)
    ├── InputError                    the task file is not JSON/JSONL at all, is empty, or cannot be read
    ├── ConfigError                   the TOML config is malformed; the message names the key
    ├── BudgetError                   the plan's estimated cost is over --max-cost-usd (nothing was sent)
    ├── LedgerError                   the run ledger is unusable or an ambiguous batch create cannot be resolved
    │   ├── RunBusyError              another live process holds the run's lease (`collect` skips the run)
    │   ├── LeaseLostError            this process's lease was taken over mid-run: it stops sending at once
    │   └── RunChangedError           an unfinished run of the same input would send other requests
    ├── BatchUnfinishedError          a batch's own calls kept failing: it stays open; the same command collects it
    └── ApiError                      the Anthropic API (or the emulator) answered with an error, or did not answer
        ├── TransientApiError         worth retrying: 408, 409, 429, 5xx, 529, dropped connections, timeouts
        └── PermanentApiError         retrying cannot help: 400, 401, 403, 404, 413, spend limits
            └── SpendLimitError       a spend limit (429 error_code, 402, self-set 400): stops the realtime lane

Per-record problems in the input are *not* exceptions: they become `Rejection` rows so the rest of the
file still runs. SDK exceptions are translated into `ApiError` in exactly one place (`batch_engine.client`).
"""

from __future__ import annotations

from collections.abc import Mapping


class BatchEngineError(Exception):
    """Base of every error batch_engine raises on purpose."""


class InputError(BatchEngineError):
    """The input file as a whole is unusable (not JSON/JSONL, empty, unreadable)."""


class ConfigError(BatchEngineError):
    """The configuration is invalid; the message names the offending key."""


class BudgetError(BatchEngineError):
    """The estimated or actual spend would exceed the configured budget."""


class LedgerError(BatchEngineError):
    """The run ledger cannot be used, or its state needs a human decision."""


class RunBusyError(LedgerError):
    """Another process that is still alive holds the run's lease: two processes would both send everything."""


class LeaseLostError(LedgerError):
    """Another process took this run's lease over (this one's heartbeat had expired): this one must stop."""


class RunChangedError(LedgerError):
    """The ledger holds an unfinished run of the same input whose requests differ from this one's."""


class BatchUnfinishedError(BatchEngineError):
    """A batch's own calls (poll, cancel, results) failed after every retry; the rest of the run finished.

    The batch stays open in the ledger: its rows are paid for, so they are not sent again realtime, and running
    the same command again (or `collect`) collects it.
    """


class ApiError(BatchEngineError):
    """An error answer (or no answer) from the Messages / Batches API."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.error_code = error_code
        # The error response's headers (rate-limit state rides on 429s too); empty when there was no response.
        self.headers: Mapping[str, str] = headers if headers is not None else {}


class TransientApiError(ApiError):
    """Retryable: rate limits, overload, server errors, dropped connections, timeouts."""


class PermanentApiError(ApiError):
    """Not retryable: the request itself is wrong or not allowed."""


class SpendLimitError(PermanentApiError):
    """The organisation's spend limit is reached; sending more cannot succeed until it resets."""
