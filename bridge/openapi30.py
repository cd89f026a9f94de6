"""The API's OpenAPI 3.1 schema rewritten as OpenAPI 3.0, for the Swagger UI that /docs serves.

FastAPI describes the API in OpenAPI 3.1; the Swagger UI the bridge ships (the swagger-ui-bundle
package's 4.x, served from the bridge because an air-gapped PBX has no CDN) reads only 3.0 and
shows "Unable to render this definition" for anything else. ``/openapi.json`` stays the true 3.1
schema for tools; ``/docs`` reads this rendering of it. Pure: a dict in, a new dict out.

What differs between the two, for what FastAPI and pydantic emit:

* ``anyOf: [X, {"type": "null"}]`` (an optional value) → ``X`` with ``nullable: true`` (a ``$ref``
  cannot have siblings in 3.0, so it goes under ``allOf``);
* ``type: [T, "null"]`` → ``type: T``, ``nullable: true``;
* ``examples: [...]`` in a schema → ``example`` (the first);
* ``const: v`` → ``enum: [v]``;
* numeric ``exclusiveMinimum``/``exclusiveMaximum`` → ``minimum``/``maximum`` with the boolean flag.
"""

from __future__ import annotations

from typing import Any

_NULL = {"type": "null"}


def openapi_30(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (OpenAPI 3.1) as OpenAPI 3.0.3; ``schema`` itself is not changed."""
    out = _convert(schema, in_schema=False)
    out["openapi"] = "3.0.3"
    return out


def _convert(node: Any, *, in_schema: bool) -> Any:
    if isinstance(node, list):
        return [_convert(v, in_schema=in_schema) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        # Below these keys is a Schema Object (where 3.1's JSON Schema keywords live).
        child_is_schema = in_schema or key in ("schema", "schemas")
        if key in ("properties", "schemas", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: _convert(v, in_schema=True) for k, v in value.items()}
        else:
            out[key] = _convert(value, in_schema=child_is_schema)
    return _schema_30(out) if in_schema else out


def _schema_30(s: dict[str, Any]) -> dict[str, Any]:
    for key in ("anyOf", "oneOf"):
        options = s.get(key)
        if isinstance(options, list) and _NULL in options:
            rest = [o for o in options if o != _NULL]
            del s[key]
            s["nullable"] = True
            if len(rest) == 1:
                only = rest[0]
                if "$ref" in only:
                    s["allOf"] = [only]
                else:
                    s = {**only, **s}
            elif rest:
                s[key] = rest
    kind = s.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) < len(kind):
            s["nullable"] = True
        if len(kinds) == 1:
            s["type"] = kinds[0]
        else:
            del s["type"]
            if kinds:
                s["anyOf"] = [{"type": k} for k in kinds]
    if isinstance(s.get("examples"), list):
        examples = s.pop("examples")
        if examples:
            s.setdefault("example", examples[0])
    if "const" in s:
        s["enum"] = [s.pop("const")]
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = s.get(exclusive)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            s[bound] = value
            s[exclusive] = True
    return s
