"""The models the emulator serves and the rules each follows, written from Anthropic's docs, not the engine's config.

The emulator stands in for the API: if it read the engine's own model table, a wrong fact there (a model that
"does not think by default") would be agreed with by every test. Each rule below names its source.

Sources (stored snapshots, 2026):
- D-OV:  platform.claude.com/docs/en/models/{haiku-5-5,sonnet-5-5,opus-5-5,fable-5-1}/overview and
         /about-claude/pricing: context window, max output, prices, minimum cacheable prompt.
- D-HK:  /models/haiku-5-5/whats-new-haiku-5-5: adaptive thinking on by default, thinking tokens count toward
         `max_tokens`, the tokenizer of Claude 4.7+ "counts about 30 percent more tokens than Claude Haiku 4.5".
- D-SN:  /models/sonnet-5-5/whats-new-sonnet-5-5: adaptive thinking on by default (effort high); `disabled` is a
         400 that points to `between_tools`; `between_tools` works at low/medium/high, 400 at xhigh/max; forced
         tool use returns an error; same tokenizer as Sonnet 5.
- D-TT:  /build-with-claude/thinking-troubleshooting and /models/opus-5-5/whats-new-opus-5-5: Opus 5.5 and Fable
         cannot turn thinking off (`disabled` → 400); Haiku 5.5 and Opus 5 take `disabled` at effort high or
         lower; default effort Opus 5.5 medium, Haiku 5.5 medium, Sonnet 5.5 high, Fable high.
- D-ET:  /build-with-claude/extended-thinking: manual `budget_tokens` only on Claude 4.x; default `display`
         `omitted` on Fable, `summarized` on Claude 4 models.
- D-O5:  /about-claude/models/whats-new-opus-5 and /models/opus-5/migration-guide: thinking on by default (adaptive),
         `disabled` only at effort high or below; "start from the default, high" (default effort high).
- D-S5:  /models/sonnet-5/migration-guide and /about-claude/models/whats-new-sonnet-5: adaptive thinking on by default,
         manual `enabled` is a 400; accepted `thinking.type` adaptive and disabled, default display omitted, 1,024-token
         cache minimum (the Sonnet 5.5 migration guide's comparison table; 3rd-party apidog "Sonnet 5.5 vs Sonnet 5");
         default effort high (3rd-party: openrouter's Sonnet 5 migration notes, "adaptive thinking on at effort high").
- D-MG:  /api/migration-2026-10-21 (see ../shared/reference/anthropic-api.md §0): sampling params are 400 on
         every model under that version; under 2023-06-01 the 5.x models reject non-default values only.
Where a source is silent the choice is marked "assumed".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens at standard (realtime) rates."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


@dataclass(frozen=True, slots=True)
class ModelRules:
    """How one model answers: limits, thinking rules, tokenizer and prices."""

    context_tokens: int
    max_output_tokens: int
    min_cacheable_tokens: int
    released: date
    rates: Rates
    # The tokenizer family: "legacy" (Claude 4.6 and older) or "new" (Claude 4.7 and later, all 5.x; ~1.3x).
    tokenizer: str = "new"
    # Manual `thinking: {type: enabled, budget_tokens}` accepted (Claude 4.x only, D-ET).
    manual_thinking: bool = False
    # Under API version 2023-06-01: temperature/top_p/top_k accepted at any value (else only at defaults, D-MG).
    sampling_params: bool = False
    # Thinks when `thinking` is omitted (D-HK, D-SN, D-TT).
    thinks_by_default: bool = True
    # Which `thinking.type` values turn thinking off; empty: it cannot be turned off (D-TT).
    off_values: frozenset[str] = frozenset()
    default_effort: str = "high"
    default_display: str = "summarized"
    # `tool_choice` `any`/`tool` accepted (Opus 5.5, Sonnet 5.5 and Fable 5.1 return 400, D-SN and §0.4).
    forced_tool_choice: bool = True
    # `output_config.format` (a JSON schema) accepted: docs /build-with-claude/structured-outputs list the 4.5+
    # models; its snapshots predate 5.x, taken as supported except Fable (3rd-party API notes; assumed).
    structured_outputs: bool = True
    long_prompt_threshold_tokens: int | None = None
    long_prompt_rates: Rates | None = None

    def rates_for_prompt(self, prompt_tokens: int) -> Rates:
        """The rate card for a request whose whole prompt has `prompt_tokens` tokens (Haiku 5.5 has two, D-OV)."""
        threshold = self.long_prompt_threshold_tokens
        if self.long_prompt_rates is not None and threshold is not None and prompt_tokens > threshold:
            return self.long_prompt_rates
        return self.rates


def _rates(input_price: float, output: float, write_5m: float, write_1h: float, read: float) -> Rates:
    return Rates(input_price, output, write_5m, write_1h, read)


MODELS: dict[str, ModelRules] = {
    "claude-haiku-5-5": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=128_000,
        min_cacheable_tokens=512,
        released=date(2026, 10, 7),
        rates=_rates(0.10, 0.50, 0.125, 0.20, 0.01),
        long_prompt_threshold_tokens=100_000,
        long_prompt_rates=_rates(0.50, 2.50, 0.625, 1.00, 0.05),
        off_values=frozenset({"disabled"}),
        default_effort="medium",
    ),
    "claude-sonnet-5-5": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=128_000,
        min_cacheable_tokens=512,
        released=date(2026, 9, 28),
        # Cache read: the migration guide says $0.10, the overview snapshot $0.20; the emulator bills $0.10.
        rates=_rates(2.00, 10.00, 2.50, 4.00, 0.10),
        off_values=frozenset({"between_tools"}),
        default_effort="high",
        default_display="omitted",
        forced_tool_choice=False,
    ),
    "claude-opus-5-5": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=128_000,
        min_cacheable_tokens=512,
        released=date(2026, 9, 22),
        rates=_rates(4.00, 20.00, 5.00, 8.00, 0.20),
        default_effort="medium",
        forced_tool_choice=False,
    ),
    "claude-fable-5-1": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=128_000,
        min_cacheable_tokens=512,
        released=date(2026, 9, 1),
        rates=_rates(10.00, 50.00, 12.50, 20.00, 0.25),
        default_effort="high",
        default_display="omitted",
        forced_tool_choice=False,
        structured_outputs=False,
    ),
    "claude-opus-5": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=128_000,
        min_cacheable_tokens=512,
        released=date(2026, 7, 24),
        rates=_rates(5.00, 25.00, 6.25, 10.00, 0.50),
        off_values=frozenset({"disabled"}),  # at effort high or below (D-O5, D-TT)
        default_effort="high",  # D-O5
    ),
    "claude-sonnet-5": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=128_000,
        min_cacheable_tokens=1024,
        released=date(2026, 7, 1),  # assumed: "mid-2026", exact date not seen
        rates=_rates(2.00, 10.00, 2.50, 4.00, 0.20),
        # Thinks by default and takes `disabled` to stop (D-S5).
        off_values=frozenset({"disabled"}),
        default_effort="high",  # D-S5 (3rd-party)
        default_display="omitted",
    ),
    "claude-sonnet-4-6": ModelRules(
        context_tokens=1_000_000,
        max_output_tokens=64_000,
        min_cacheable_tokens=1024,
        released=date(2026, 2, 17),  # assumed
        rates=_rates(3.00, 15.00, 3.75, 6.00, 0.30),
        tokenizer="legacy",
        manual_thinking=True,
        sampling_params=True,
        thinks_by_default=False,
        off_values=frozenset({"disabled"}),
    ),
    "claude-haiku-4-5": ModelRules(
        context_tokens=200_000,
        max_output_tokens=64_000,
        min_cacheable_tokens=4096,
        released=date(2025, 10, 1),
        rates=_rates(1.00, 5.00, 1.25, 2.00, 0.10),
        tokenizer="legacy",
        manual_thinking=True,
        sampling_params=True,
        thinks_by_default=False,
        off_values=frozenset({"disabled"}),
    ),
}

# API versions (the `anthropic-version` header). SDK 2.x sends 2026-10-21; 1.x and older sent 2023-06-01.
VERSION_2026_10_21 = "2026-10-21"
OLDEST_VERSION = "2023-06-01"
KNOWN_VERSIONS = ("2023-01-01", OLDEST_VERSION, VERSION_2026_10_21)
