"""bridge/openapi30.py: the 3.1 schema FastAPI emits, as the OpenAPI 3.0 the bundled Swagger UI reads."""

from __future__ import annotations

import copy
import json

from bridge.openapi30 import openapi_30


def test_each_31_construct_becomes_its_30_form():
    src = {"openapi": "3.1.0", "paths": {"/x": {"get": {"parameters": [
        {"name": "limit", "in": "query", "schema": {"anyOf": [{"type": "integer", "exclusiveMinimum": 0},
                                                              {"type": "null"}], "title": "Limit"}}]}}},
           "components": {"schemas": {"M": {"type": "object", "properties": {
               "ref": {"anyOf": [{"$ref": "#/components/schemas/N"}, {"type": "null"}]},
               "both": {"type": ["string", "null"], "examples": ["a", "b"]},
               "many": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
               "kind": {"const": "call"},
               # Not a schema: an "examples" map of a media type stays as it is.
           }}, "N": {"type": "string"}}}}
    before = copy.deepcopy(src)
    out = openapi_30(src)
    assert src == before  # not changed in place
    assert out["openapi"] == "3.0.3"
    limit = out["paths"]["/x"]["get"]["parameters"][0]["schema"]
    assert limit == {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "nullable": True, "title": "Limit"}
    props = out["components"]["schemas"]["M"]["properties"]
    assert props["ref"] == {"allOf": [{"$ref": "#/components/schemas/N"}], "nullable": True}
    assert props["both"] == {"type": "string", "nullable": True, "example": "a"}
    assert props["many"] == {"anyOf": [{"type": "string"}, {"type": "integer"}], "nullable": True}
    assert props["kind"] == {"enum": ["call"]}
    assert '"type": "null"' not in json.dumps(out)


def test_the_real_schema_has_no_31_left(tmp_path):
    from bridge.api import create_app
    from bridge.app import Bridge
    from bridge.config import Config

    bridge = Bridge(Config.model_validate({"audiosocket": {"listen": "127.0.0.1:0"}, "gateway": {"demo": True},
                                           "api": {"listen": "127.0.0.1:0", "token": "t" * 24},
                                           "store": {"path": str(tmp_path / "s.db")}}))
    schema = create_app(bridge).openapi()
    out = json.dumps(openapi_30(schema))
    assert '"type": "null"' not in out and '"const"' not in out and '"openapi": "3.0.3"' in out
    assert '"securitySchemes": {"bearer"' in out
