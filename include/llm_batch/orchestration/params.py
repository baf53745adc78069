"""The trigger form: one Airflow `Param` per field of the job request's declaration.

Each field gets the widget of Airflow's trigger form that shows exactly what is sent:

- JSON (the filter, LLM parameters) is a text box typed `["null", "object", "string"]`: valid
  JSON goes as the object it spells, anything else as the very text typed, which `create_job`
  refuses with the reason in the run's note. (An `object`-only field keeps sending the last
  valid JSON after an edit breaks it, and shows `{}` for a null it sends.)
- Numbers with a default keep their bounds in the schema, where the server checks them when
  the run is triggered (a 400 whose reason the form shows), but under `allOf`: the form's
  number box clamps to a top-level `minimum`/`maximum` on blur (0 became 1, 6000 became
  5000). A number typed wrong there empties the box, which the form then refuses as required.
- Numbers that may be left empty (the budget) are text boxes: the number box turns a typed
  "-1" into NaN and sends null, i.e. no budget. Their schema has no `type` (the form then
  shows a plain text box) but an `anyOf`: a number within bounds, null, or text, which
  `create_job` reads as a number or refuses with the reason in the run's note.
- Switches admit null so the form marks no "required" star on a field that has a default.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from airflow.sdk import Param

from llm_batch.request import REQUEST_FIELDS, REQUEST_KEYS, Group, Kind, RequestField

_JSON_TYPES: dict[Kind, list[str]] = {
    Kind.IDS: ["null", "array"],
    Kind.FILTER: ["null", "object", "string"],
    Kind.OBJECT: ["null", "object", "string"],
    Kind.TEXT: ["null", "string"],
    Kind.JOB_ID: ["null", "string"],
    Kind.MODEL: ["null", "string"],
    Kind.BOOL: ["boolean", "null"],
    Kind.INTEGER: ["integer"],
    Kind.NUMBER: ["number"],
    Kind.CHOICE: ["string"],
}

FORM_LIMIT = 100
"""The operator's form starts at a trial-sized job; a request without a limit (API, CLI)
takes up to `MAX_TASKS_PER_JOB`."""

SECTIONS: dict[Group, str] = {
    Group.SELECTION: "Which tasks",
    Group.WHAT_TO_ASK: "What to ask",
    Group.LIMITS: "Limits and safety",
    Group.ADVANCED: "Resume and cache",
}
"""The form's sections, in the order they are shown."""


FINITE: dict[str, Any] = {
    # NaN passes every bound (each comparison with it is false): a NaN budget would be no
    # budget. No finite number is both >= 0 and < 0; NaN is, so this refuses NaN alone.
    "not": {"type": "number", "minimum": 0, "exclusiveMaximum": 0},
}
"""Schema keywords that refuse NaN and infinity in a number field (infinity: the maximum)."""


def job_params(**defaults: Any) -> dict[str, Param]:
    """Return the trigger form, with `defaults` overriding the fields' default values."""
    unknown = sorted(set(defaults) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(
            f"job_params() got default(s) for {', '.join(unknown)}, which the job request does "
            f"not declare; declared fields: {', '.join(REQUEST_KEYS)}"
        )
    order = list(SECTIONS)
    fields = sorted(REQUEST_FIELDS, key=lambda field: order.index(field.group))
    return {
        field.name: Param(
            copy.deepcopy(defaults.get(field.name, field.default)),
            description=field.help,
            **param_schema(field),
        )
        for field in fields
    }


def param_schema(field: RequestField) -> dict[str, Any]:
    """Return the JSON schema of `field` on the form (without its description)."""
    bounds = {
        key: value
        for key, value in (("minimum", field.minimum), ("maximum", field.maximum))
        if value is not None
    }
    if field.kind is Kind.NUMBER:
        bounds.setdefault("maximum", sys.float_info.max)  # the largest finite float: no infinity
        bounds.update(FINITE)
    json_type = list(_JSON_TYPES[field.kind])
    schema: dict[str, Any]
    if field.kind is Kind.NUMBER and field.default is None:
        schema = {"anyOf": [{"type": "null"}, {"type": "number", **bounds}, {"type": "string"}]}
        bounds = {}
    else:
        if field.default is None and "null" not in json_type:
            # A field without a default may be left empty.
            json_type.insert(0, "null")
        schema = {"type": json_type if len(json_type) > 1 else json_type[0]}
    if field.kind is Kind.IDS:
        schema["items"] = {"type": "string"}
    if field.kind is Kind.TEXT:
        schema["format"] = "multiline"
    if field.choices:
        schema["enum"] = [None, *field.choices] if field.default is None else list(field.choices)
    if bounds:
        schema["allOf"] = [bounds]
    schema["title"] = field.title
    schema["section"] = SECTIONS[field.group]
    return schema
