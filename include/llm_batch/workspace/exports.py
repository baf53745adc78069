"""A job's results as CSV or JSON Lines, streamed row by row (5000 results never held at once)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from llm_batch.store import JobStore
from llm_batch.workspace.queries import iter_results

FORMATS = ("csv", "jsonl")
CSV_COLUMNS = (
    "job_id",
    "task_id",
    "batch_no",
    "status",
    "confidence",
    "model",
    "error_type",
    "error_message",
    "output",
    "original_output",
    "reviewed_by",
    "review_decision",
    "updated_at",
)


def csv_lines(store: JobStore, job_id: str) -> Iterator[str]:
    """Yield the header, then one CSV line per result (JSON fields as JSON text)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(row: list[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        return buffer.getvalue()

    yield line(list(CSV_COLUMNS))
    for result in iter_results(store, job_id):
        error = result.get("error") or {}
        review = result.get("review") or {}
        yield line(
            [
                job_id,
                result.get("task_id"),
                result.get("batch_no"),
                result.get("status"),
                result.get("confidence"),
                result.get("model"),
                error.get("type"),
                error.get("message"),
                _json(result.get("output")),
                _json(result["original_output"]) if "original_output" in result else "",
                review.get("by"),
                review.get("decision"),
                _iso(result.get("updated_at")),
            ]
        )


def jsonl_lines(store: JobStore, job_id: str) -> Iterator[str]:
    """Yield one JSON document per result and line."""
    for result in iter_results(store, job_id):
        result.pop("_id", None)
        yield json.dumps({"job_id": job_id, **result}, default=_iso, ensure_ascii=False) + "\n"


def streaming_response(store: JobStore, job_id: str, fmt: str) -> StreamingResponse:
    lines = csv_lines(store, job_id) if fmt == "csv" else jsonl_lines(store, job_id)
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson"
    return StreamingResponse(
        lines,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{job_id}-results.{fmt}"'},
    )


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
