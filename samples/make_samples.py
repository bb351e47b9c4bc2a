"""Regenerate the sample files: `python samples/make_samples.py` (deterministic)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import orjson

HERE = Path(__file__).parent
DEFAULT = HERE.parent / "batch_engine" / "default_config.toml"

# A realistic house style shared by every task type; long enough (> 512 tokens) to be worth caching.
HOUSE_RULES = " ".join(
    [
        "You work for the data platform team of a mid-sized company that runs several hundred services.",
        "Our readers are busy engineers: lead with the answer, then the evidence, then the next step.",
        "Prefer concrete names (service, table, job, host) over generalities, and say when you are unsure.",
        "Never invent metrics, owners, ticket numbers or log lines that are not in the input.",
        "Use plain English, short sentences and active voice; avoid marketing language and filler.",
        "Format with Markdown headings and bullet lists only when the output is longer than five lines.",
        "Times are UTC in ISO-8601; sizes use binary units (KiB, MiB, GiB); money is USD with two decimals.",
        "When the input contains secrets or personal data, do not repeat them; refer to them by type.",
        "If the input is empty, truncated or in another language, say so in one line and stop.",
    ]
    * 6
)


def long_config() -> str:
    """The default config with every system prompt extended by the house rules."""
    text = DEFAULT.read_text(encoding="utf-8")
    return re.sub(
        r'^system = "(.*)"$',
        lambda m: f'system = "{m.group(1)} {HOUSE_RULES}"',
        text,
        flags=re.MULTILINE,
    )


SERVICES = ["checkout", "search", "ingest", "billing", "auth", "notifications", "warehouse-etl"]
TEAMS = ["data-platform", "ml-infra", "payments", "growth"]


def nightly_tasks(rng: random.Random) -> list[dict[str, object]]:
    """A few hundred tasks across the batch and realtime task types."""
    tasks: list[dict[str, object]] = []

    def add(task_type: str, input_data: dict[str, object], **extra: object) -> None:
        tasks.append(
            {
                "task_id": f"{task_type}-{len(tasks):04d}",
                "task_type": task_type,
                "input_data": input_data,
                "metadata": {"source": "nightly", "seq": len(tasks)},
                **extra,
            }
        )

    for i in range(300):
        kind = i % 10
        service = rng.choice(SERVICES)
        if kind in (0, 1):
            lines = "\n".join(
                f"2026-11-21T0{h}:1{h}:00Z {service} {rng.choice(['INFO', 'WARN', 'ERROR'])} "
                f"request latency {rng.randint(20, 4000)}ms"
                for h in range(rng.randint(3, 8))
            )
            add("analyze_logs", {"service": service, "logs": lines})
        elif kind in (2, 3):
            add("classify_bulk", {"text": f"Ticket {i}: the {service} page shows an error after I pay."})
        elif kind == 4:
            add(
                "summarize",
                {"document": f"Postmortem for {service}: " + "timeline entry. " * rng.randint(5, 40)},
            )
        elif kind == 5:
            add("generate_docs", {"code": f"def handle_{service.replace('-', '_')}(event, retries=3): ..."})
        elif kind == 6:
            add("generate_tests", {"code": f"def parse_{i}(s: str) -> int:\n    return int(s.strip())"})
        elif kind == 7:
            add(
                "generate_report",
                {"team": rng.choice(TEAMS), "week": "2026-W47", "notes": "shipped; on call"},
            )
        elif kind == 8:
            add("user_query", {"question": f"Which table holds the {service} daily aggregates?"})
        else:
            add("chat", {"message": f"Can you explain why {service} retries are failing?"})
    # A batch-type task with a near deadline goes realtime; an urgent incident and a forced batch one.
    add("summarize", {"document": "Quarterly on-call summary."}, deadline="2026-11-22T06:00:00Z")
    add("critical_fix", {"incident": "checkout 500s", "code": "if cart is None: raise"})
    add("security_incident", {"alert": "unusual token use", "context": "auth service, 3 regions"})
    add("chat", {"message": "Low-priority question that can wait."}, mode="batch")
    return tasks


BAD_LINES = [
    b'{"task_id": "ok-1", "task_type": "summarize", "input_data": {"document": "fine"}}',
    b'{"task_id": "missing-type", "input_data": {"document": "x"}}',
    b'{"task_id": "bad id with spaces", "task_type": "summarize", "input_data": {"document": "x"}}',
    b'{"task_id": "ok-1", "task_type": "summarize", "input_data": {"document": "duplicate id"}}',
    b'{"task_id": "unknown-type", "task_type": "translate", "input_data": {}}',
    b'{"task_id": "missing-var", "task_type": "analyze_logs", "input_data": {"service": "x"}}',
    b'{"task_id": "wrong-type", "task_type": "summarize", "input_data": "not an object"}',
    b'{"task_id": "bad-tier", "task_type": "summarize", "model_tier": "huge", "input_data": {"document": "x"}}',
    b'{"task_id": "truncated", "task_type": "summ',
    b'["an", "array", "not", "an", "object"]',
    b'{"task_id": "ok-2", "task_type": "chat", "input_data": {"message": "hello"}}',
]


VENDORS = [("Acme Hosting GmbH", "DE", "EUR"), ("Northwind Data Ltd", "GB", "GBP"), ("Contoso Cloud Inc", "US", "USD")]
ITEMS = [("GPU node, 1 month", "hardware"), ("Database licence", "software"), ("On-call support", "services")]


def invoice_tasks(rng: random.Random) -> list[dict[str, object]]:
    """Invoice texts for the extract_invoice task type (its output schema: nested objects, enums, arrays)."""
    tasks: list[dict[str, object]] = []
    for i in range(24):
        vendor, country, currency = VENDORS[i % len(VENDORS)]
        lines = [
            f"- {name}: {rng.randint(1, 9)} x {rng.randint(20, 900)}.00 {currency}"
            for name, _ in rng.sample(ITEMS, k=rng.randint(1, len(ITEMS)))
        ]
        text = "\n".join(
            [f"INVOICE INV-2026-{1000 + i}", f"From: {vendor} ({country})", f"Date: 2026-11-{1 + i:02d}", *lines]
        )
        task: dict[str, object] = {
            "task_id": f"invoice-{i:04d}",
            "task_type": "extract_invoice",
            "input_data": {"text": text},
        }
        if i % 8 == 0:
            task["mode"] = "realtime"  # a few needed now: the same schema through the realtime lane
        tasks.append(task)
    return tasks


def main() -> None:
    rng = random.Random(20261122)
    (HERE / "config.toml").write_text(long_config(), encoding="utf-8")
    (HERE / "nightly_tasks.json").write_bytes(orjson.dumps(nightly_tasks(rng), option=orjson.OPT_INDENT_2))
    (HERE / "bad_tasks.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")
    invoices = invoice_tasks(random.Random(20261201))
    (HERE / "invoices.jsonl").write_bytes(b"".join(orjson.dumps(task) + b"\n" for task in invoices))


if __name__ == "__main__":
    main()
