"""Pure planning core: routing, params, chunking, pricing, merge. No network, no files, no clock.

The types below are the contract between planning and the lanes that execute a plan.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from batch_engine.config import Config, Route
from batch_engine.models import Rejection

if TYPE_CHECKING:
    from batch_engine.files import RawRecord
    from batch_engine.structured_output import OutputSpec


def with_user_text(frame: dict[str, Any], user_text: str | None) -> dict[str, Any]:
    """The params of a frame and a user text (a new dict each time; the frame's own values are shared)."""
    if user_text is None:
        return frame
    params = dict(frame)
    params["messages"] = [{"role": "user", "content": user_text}]
    return params


def compact_json(value: Any) -> bytes:
    """`value` as JSON, in a bytes object of its own size, for keeping: orjson returns its bytes inside its write
    buffer of ~4 KB whatever their length (`sys.getsizeof` does not show it), which a field kept per task held
    alive: ~4 KB of each task's plan, most of a 100k-task run's peak memory."""
    return bytes(memoryview(orjson.dumps(value)))


# Read-only by its `Final` fields (mypy refuses an assignment), not by `frozen=True`: a frozen dataclass sets each
# field through `object.__setattr__`, which was ~2 µs of planning each of 100k tasks (`bench plan`).
@dataclass(slots=True)
class PlannedTask:
    """A validated task with its route decided and its Messages API params rendered."""

    index: Final[int]  # 0-based position of the record in the input file
    task_id: Final[str]
    task_type: Final[str]
    route: Final[Route]
    route_reason: Final[str]
    model: Final[str]
    # The params around the user message, shared by tasks that render the same (never mutate).
    frame: Final[dict[str, Any]]
    user_text: Final[str | None]  # the user message; None when the input gave raw params (then `frame` is all of them)
    estimated_input_tokens: Final[int]
    cache_key: Final[str | None]  # digest of the cacheable prefix; rows sharing it are kept adjacent in batches
    stream: Final[bool]  # send with messages.stream on the realtime lane
    # The record's metadata as JSON (decoded when its result is built): as a dict it took ~250 bytes of each
    # task's ~860 in the plan of a nightly job's records.
    metadata_json: Final[bytes | None]
    # The answer's schema and the form it is requested in (shared, never mutate).
    output: Final[OutputSpec | None] = None

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The record's metadata, copied to its output row."""
        return None if self.metadata_json is None else orjson.loads(self.metadata_json)

    @property
    def params(self) -> dict[str, Any]:
        """Ready for messages.create / a batch row's params (never contains "stream"); built on each access."""
        return with_user_text(self.frame, self.user_text)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One future batch: positions into Plan.tasks (not input indexes) and the serialized size."""

    number: int
    task_positions: tuple[int, ...]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: tuple[PlannedTask, ...]  # valid tasks, in input order
    rejections: tuple[Rejection, ...]
    chunks: tuple[Chunk, ...]  # covers exactly the batch-route tasks
    total_records: int
    warnings: tuple[str, ...] = ()  # what planning changed on the user's behalf (a capped max_tokens), one line each

    def batch_tasks(self) -> list[PlannedTask]:
        return [task for task in self.tasks if task.route == "batch"]

    def realtime_tasks(self) -> list[PlannedTask]:
        return [task for task in self.tasks if task.route == "realtime"]


def over_context_window(
    tasks: Iterable[PlannedTask], counted: Mapping[int, int], config: Config
) -> list[tuple[PlannedTask, str, str]]:
    """(task, field, reason) for each task whose counted input (messages.count_tokens) is over its model's context
    window: planning let it through on the offline estimate, the count says the API would answer 400."""
    over: list[tuple[PlannedTask, str, str]] = []
    for task in tasks:
        tokens = counted.get(task.index)
        window = config.models[task.model].context_tokens
        if tokens is not None and tokens > window:
            field = "params" if task.user_text is None else "input_data"
            reason = f"prompt of {tokens:,} tokens (counted) exceeds {task.model}'s context window of {window:,}"
            over.append((task, field, reason))
    return over


# (source of the max_tokens, model, requested, cap) → [tasks capped, where the first one is]
Capped = dict[tuple[str, str, int, int], list[Any]]


@dataclass(frozen=True, slots=True)
class PlannedPart:
    """The records of one stretch of the input planned, not yet chunked: what `make_plan` joins (a stretch of a
    large JSONL file may be planned by another process, `batch_engine.parallel_plan`)."""

    tasks: list[PlannedTask]
    rejections: list[Rejection]
    capped: Capped
    total: int  # records read, rejected ones included


def make_plan(
    records: Iterable[RawRecord],
    config: Config,
    now: datetime,
    route: Route | None = None,
    on_batch_work: Callable[[], None] | None = None,
) -> Plan:
    """Validate, route, render and chunk every record; bad records become rejections.

    `route` forces every task onto one lane (`--realtime-only` / `--batch-only`).
    """
    return join_parts([plan_records(records, config, now, route, on_batch_work)], config)


def join_parts(parts: Sequence[PlannedPart], config: Config) -> Plan:
    """The plan of consecutive parts of one input (in input order), chunked. The parts must not share a task_id
    (`plan_records` rejects a repeat within its own part; across parts the caller checks)."""
    from batch_engine.planning.chunking import chunk_tasks
    from batch_engine.planning.rows import RowEncoder

    tasks = [task for part in parts for task in part.tasks] if len(parts) > 1 else parts[0].tasks
    rejections = [rejection for part in parts for rejection in part.rejections]
    capped: Capped = {}
    for part in parts:
        for key, (count, first) in part.capped.items():
            capped.setdefault(key, [0, first])[0] += count
    batch_positions = [pos for pos, task in enumerate(tasks) if task.route == "batch"]
    chunks = chunk_tasks(
        tasks,
        config.limits.max_requests_per_batch,
        config.limits.max_bytes_per_batch,
        positions=batch_positions,
        encoder=RowEncoder(),
    )
    warnings = tuple(
        f"warning: {source} {requested} is above {model}'s output limit; capped at {cap} for {count} tasks "
        f"(first: {first})"
        for (source, model, requested, cap), (count, first) in capped.items()
    )
    return Plan(
        tasks=tuple(tasks),
        rejections=tuple(rejections),
        chunks=tuple(chunks),
        total_records=sum(part.total for part in parts),
        warnings=warnings,
    )


def plan_records(
    records: Iterable[RawRecord],
    config: Config,
    now: datetime,
    route: Route | None = None,
    on_batch_work: Callable[[], None] | None = None,
) -> PlannedPart:
    """Validate, route and render `records` (a stretch of the input, in order); bad records become rejections."""
    from batch_engine.planning.params import (
        TemplateError,
        build_request,
        cache_key,
        output_form,
        render,
        shared_frame_key,
    )
    from batch_engine.planning.routing import route_task
    from batch_engine.planning.tokens import estimate_params_tokens, estimate_tokens
    from batch_engine.planning.validate import validate_record
    from batch_engine.structured_output import OutputSpec

    tasks: list[PlannedTask] = []
    rejections: list[Rejection] = []
    capped: Capped = {}
    seen: set[str] = set()
    # One compiled schema per task type and model (or per distinct raw-params schema), shared by its tasks.
    outputs: dict[tuple[str, str], OutputSpec] = {}
    # id(frame) → (frame, its tokens without the user message, its cache key): tasks that render alike share one
    # frame, and its ~5 KB system prompt is measured and hashed once, not once per task.
    frames: dict[int, tuple[dict[str, Any], int, str | None]] = {}
    # `shared_frame_key` → (model, frame): the frame of tasks whose records put nothing of their own in it, built
    # once; each such task only renders its user message.
    shared: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    total = 0
    for record in records:
        total += 1
        if record.error is not None:
            rejections.append(Rejection(index=record.index, line=record.line, field="<record>", reason=record.error))
            continue
        checked = validate_record(record.value, record.index, record.line, config)
        if isinstance(checked, Rejection):
            rejections.append(checked)
            continue
        if checked.task_id in seen:
            rejections.append(
                Rejection(
                    index=record.index,
                    line=record.line,
                    task_id=checked.task_id,
                    field="task_id",
                    reason="duplicate task_id (already used by an earlier record)",
                )
            )
            continue
        task_type = config.task_types[checked.task_type]
        if route is None:
            task_route, reason = route_task(checked, task_type, now, config.batch_sla_s)
        else:
            task_route, reason = route, f"every task forced to {route} for this run"
        if task_route == "batch" and on_batch_work is not None:
            on_batch_work()  # once, at the first batch task: what the batch lane needs can start loading
            on_batch_work = None
        model = checked.model or config.model_for_tier(checked.model_tier or task_type.tier)
        output: OutputSpec | None = None
        if checked.params is not None:
            raw_config = checked.params.get("output_config")
            raw_format = raw_config.get("format") if isinstance(raw_config, dict) else None
            if raw_format is not None:
                key = ("params", orjson.dumps(raw_format["schema"], option=orjson.OPT_SORT_KEYS).decode())
                output = outputs.get(key) or outputs.setdefault(
                    key, OutputSpec.of(raw_format["schema"], "output_config")
                )
        elif task_type.output_schema is not None:
            key = (checked.task_type, model)
            output = outputs.get(key)
            if output is None:
                form = output_form(config.models[model], task_type.thinking)
                output = outputs[key] = OutputSpec.of(task_type.output_schema, form)
        try:
            frame_key = shared_frame_key(checked, task_type, task_route)
            built = None if frame_key is None else shared.get(frame_key)
            if built is None:
                model, frame, user_text = build_request(checked, task_type, config, task_route, output)
                if frame_key is not None:
                    shared[frame_key] = model, frame
            else:
                model, frame = built
                user_text = render(task_type.user, checked.input_data)
        except TemplateError as exc:
            rejections.append(
                Rejection(
                    index=record.index,
                    line=record.line,
                    task_id=checked.task_id,
                    field=exc.field,
                    reason=str(exc),
                )
            )
            continue
        spec = config.models[model]
        if user_text is None:  # raw params: a frame of its own
            estimated, prefix_key = estimate_params_tokens(frame, spec.tokenizer_factor), cache_key(frame)
        else:
            facts = frames.get(id(frame))
            if facts is None:
                empty = with_user_text(frame, "")  # an empty message adds no tokens
                facts = frames[id(frame)] = (
                    frame,
                    estimate_params_tokens(empty, spec.tokenizer_factor),
                    cache_key(frame),
                )
            estimated = facts[1] + estimate_tokens(user_text, spec.tokenizer_factor)
            prefix_key = facts[2]
        if estimated > spec.context_tokens:
            # The API answers 400 "prompt is too long" (in a batch, only once the batch ends): refuse it here.
            rejections.append(
                Rejection(
                    index=record.index,
                    line=record.line,
                    task_id=checked.task_id,
                    field="params" if user_text is None else "input_data",
                    reason=f"prompt of ~{estimated:,} tokens (offline estimate) exceeds {model}'s context window "
                    f"of {spec.context_tokens:,}",
                )
            )
            continue
        seen.add(checked.task_id)
        requested = (checked.params or {}).get("max_tokens") or checked.max_tokens or task_type.max_tokens
        if frame["max_tokens"] < requested:
            source = "the record's max_tokens" if checked.max_tokens else f"task type {checked.task_type}'s max_tokens"
            where = f"line {record.line}" if record.line is not None else f"record {record.index}"
            first = f"{where}, task_id {checked.task_id}"
            capped.setdefault((source, model, requested, frame["max_tokens"]), [0, first])[0] += 1
        tasks.append(
            PlannedTask(
                index=record.index,
                task_id=checked.task_id,
                # One string per distinct type and reason, not one per task: a plan of 1M tasks keeps them all.
                task_type=sys.intern(checked.task_type),
                route=task_route,
                route_reason=sys.intern(reason),
                model=model,
                frame=frame,
                user_text=user_text,
                estimated_input_tokens=estimated,
                cache_key=prefix_key,
                stream=task_type.stream,
                metadata_json=None if checked.metadata is None else compact_json(checked.metadata),
                output=output,
            )
        )
    return PlannedPart(tasks, rejections, capped, total)
