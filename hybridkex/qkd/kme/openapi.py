"""The OpenAPI 3.1 description of the simulated KME (ETSI GS QKD 014 V1.1.1 as implemented here).

Each KME serves it at ``/api/v1/openapi.json``; ``docs/openapi-etsi-qkd-014.json`` is the same
document, regenerated with (a test checks the two agree)::

    python -c "import sys, hybridkex.qkd.kme.openapi as o; sys.stdout.write(o.render())" \
        > docs/openapi-etsi-qkd-014.json
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ..etsi014 import (
    MSG_BAD_REQUEST,
    MSG_EXTENSION_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SERVER_ERROR,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    MSG_UNAUTHORIZED,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json_content(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _errors(bad_request: str) -> dict[str, Any]:
    return {
        "400": {"description": f"{MSG_BAD_REQUEST} {bad_request}", "content": _json_content(_ref("Error"))},
        "401": {
            "description": f"{MSG_UNAUTHORIZED} The client certificate's SAE ID is not served by this KME, or "
            "(dec_keys) was not named as a slave when the keys were issued.",
            "content": _json_content(_ref("Error"), {"message": MSG_UNAUTHORIZED}),
        },
        "503": {
            "description": f"{MSG_SERVER_ERROR} Typically not enough key material on the QKD link yet; the "
            "Retry-After header says when to try again.",
            "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
            "content": _json_content(_ref("Error"), {
                "message": MSG_SERVER_ERROR,
                "details": [{"reason": "not enough key material on the QKD link yet"}],
            }),
        },
    }


def _sae_param(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": f"URL-encoded SAE ID of the {what} SAE.",
            "schema": {"type": "string", "minLength": 1}}


_KEY_CONTAINER_OK = {
    "description": "OK: a Key container.",
    "content": _json_content(_ref("KeyContainer"), {
        "keys": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139",
                  "key": "wHHVxRwDJs3/bXd38GHP3oe4svTuRpZS0yCC7x4Ly+s="}]
    }),
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "ETSI GS QKD 014 key delivery API (hybridkex simulated KME)",
        "version": "1.1.1",
        "summary": "REST-based key delivery between a KME and its SAEs, as served by 'hybridkex kme'.",
        "description": (
            "ETSI GS QKD 014 V1.1.1 (2019-02). Mutual TLS is mandatory: the caller's SAE ID is the subject CN "
            "of its client certificate. Keys are base64 (RFC 4648, padded), sizes are in bits and must be "
            "multiples of 8, key IDs are UUIDs. Only the status codes 200, 400, 401 and 503 occur, every "
            "error with an Error body. Choices where the spec is silent: a request that exceeds "
            "max_key_per_request or the key size bounds gets 400; a replayed or unknown key ID gets 400 "
            f"with '{MSG_KEYS_NOT_FOUND}'; unknown members of a Key request or Key IDs object get 400; "
            "extension_optional is ignored (normal answer); no extension_mandatory parameter is supported "
            f"(400 '{MSG_EXTENSION_MANDATORY_UNSUPPORTED}'); unknown paths and methods get 400, not 404/405."
        ),
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "servers": [{"url": "https://127.0.0.1:{port}", "variables": {"port": {"default": "8443"}}}],
    "security": [{"mutualTLS": []}],
    "paths": {
        "/api/v1/keys/{slave_SAE_ID}/status": {
            "get": {
                "operationId": "getStatus",
                "summary": "Get status (cl. 5.2): keys available to the caller (master) for the named slave SAE.",
                "parameters": [_sae_param("slave_SAE_ID", "slave")],
                "responses": {
                    "200": {"description": "OK: a Status object.", "content": _json_content(_ref("Status"))},
                    **_errors("The slave SAE ID is unknown to this KME network."),
                },
            }
        },
        "/api/v1/keys/{slave_SAE_ID}/enc_keys": {
            "get": {
                "operationId": "getKeySimple",
                "summary": "Get key (cl. 5.3), simple form: only number and size, as query parameters.",
                "parameters": [
                    _sae_param("slave_SAE_ID", "slave"),
                    {"name": "number", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "default": 1}},
                    {"name": "size", "in": "query", "required": False,
                     "description": "Key size in bits (default: Status key_size).",
                     "schema": {"type": "integer", "minimum": 8, "multipleOf": 8}},
                ],
                "responses": {"200": _KEY_CONTAINER_OK, **_errors(
                    f"E.g. '{MSG_SIZE_NOT_MULTIPLE_OF_8}', or any query parameter other than number and size."
                )},
            },
            "post": {
                "operationId": "getKey",
                "summary": "Get key (cl. 5.3): the caller (master) takes keys shared with the named slave SAE(s).",
                "parameters": [_sae_param("slave_SAE_ID", "slave")],
                # cl. 6.2: the Key request "may be empty"; an empty body means {} (all defaults).
                "requestBody": {"required": False,
                                "content": _json_content(_ref("KeyRequest"), {"number": 2, "size": 256})},
                "responses": {"200": _KEY_CONTAINER_OK, **_errors(
                    f"E.g. '{MSG_SIZE_NOT_MULTIPLE_OF_8}', '{MSG_EXTENSION_MANDATORY_UNSUPPORTED}', number above "
                    "max_key_per_request, size outside min_key_size..max_key_size, or the caller named as its "
                    "own slave or additional slave."
                )},
            },
        },
        "/api/v1/keys/{master_SAE_ID}/dec_keys": {
            "get": {
                "operationId": "getKeyWithKeyIDSimple",
                "summary": "Get key with key IDs (cl. 5.4), simple form: one key ID as a query parameter.",
                "parameters": [
                    _sae_param("master_SAE_ID", "master"),
                    {"name": "key_ID", "in": "query", "required": True,
                     "schema": {"type": "string", "format": "uuid"}},
                ],
                "responses": {"200": _KEY_CONTAINER_OK, **_errors(f"E.g. '{MSG_KEYS_NOT_FOUND}'.")},
            },
            "post": {
                "operationId": "getKeyWithKeyIDs",
                "summary": "Get key with key IDs (cl. 5.4): a slave SAE fetches keys its master received; "
                           "each key is delivered once per slave, then deleted.",
                "parameters": [_sae_param("master_SAE_ID", "master")],
                "requestBody": {"required": True, "content": _json_content(_ref("KeyIDs"), {
                    "key_IDs": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139"}]
                })},
                "responses": {"200": _KEY_CONTAINER_OK, **_errors(f"E.g. '{MSG_KEYS_NOT_FOUND}'.")},
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1 document.",
                                      "content": _json_content({"type": "object"})}},
            }
        },
    },
    "components": {
        "securitySchemes": {
            "mutualTLS": {"type": "mutualTLS",
                          "description": "TLS 1.2+ client certificate; its subject CN is the caller's SAE ID."},
        },
        "schemas": {
            "Status": {
                "type": "object",
                "description": "Status data format (Table 9).",
                "required": ["source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
                             "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                             "min_key_size", "max_SAE_ID_count"],
                "properties": {
                    "source_KME_ID": {"type": "string"},
                    "target_KME_ID": {"type": "string"},
                    "master_SAE_ID": {"type": "string"},
                    "slave_SAE_ID": {"type": "string"},
                    "key_size": {"type": "integer", "description": "Default key size in bits."},
                    "stored_key_count": {"type": "integer"},
                    "max_key_count": {"type": "integer"},
                    "max_key_per_request": {"type": "integer"},
                    "max_key_size": {"type": "integer"},
                    "min_key_size": {"type": "integer"},
                    "max_SAE_ID_count": {"type": "integer"},
                    "status_extension": {"type": "object"},
                },
                "additionalProperties": False,
            },
            "KeyRequest": {
                "type": "object",
                "description": "Key request data format (Table 10); every member is optional.",
                "properties": {
                    "number": {"type": "integer", "minimum": 1, "default": 1},
                    "size": {"type": "integer", "minimum": 8, "multipleOf": 8},
                    "additional_slave_SAE_IDs": {"type": "array", "items": {"type": "string"}},
                    "extension_mandatory": {"type": "array", "items": {"type": "object", "maxProperties": 1}},
                    "extension_optional": {"type": "array", "items": {"type": "object", "maxProperties": 1}},
                },
                "additionalProperties": False,
            },
            "Key": {
                "type": "object",
                "required": ["key_ID", "key"],
                "properties": {
                    "key_ID": {"type": "string", "format": "uuid"},
                    "key_ID_extension": {"type": "object"},
                    "key": {"type": "string", "contentEncoding": "base64"},
                    "key_extension": {"type": "object"},
                },
            },
            "KeyContainer": {
                "type": "object",
                "description": "Key container data format (Table 11).",
                "required": ["keys"],
                "properties": {
                    "keys": {"type": "array", "items": _ref("Key")},
                    "key_container_extension": {"type": "object"},
                },
            },
            "KeyIDs": {
                "type": "object",
                "description": "Key IDs data format (Table 12).",
                "required": ["key_IDs"],
                "properties": {
                    "key_IDs": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["key_ID"],
                            "properties": {"key_ID": {"type": "string", "format": "uuid"},
                                           "key_ID_extension": {"type": "object"}},
                        },
                    },
                    "key_IDs_extension": {"type": "object"},
                },
                "additionalProperties": False,
            },
            "Error": {
                "type": "object",
                "description": "Error data format (Table 13).",
                "required": ["message"],
                "properties": {
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI document."""
    return copy.deepcopy(_DOCUMENT)


def render() -> str:
    """The document as the JSON text stored in ``docs/openapi-etsi-qkd-014.json``."""
    return json.dumps(_DOCUMENT, indent=2, ensure_ascii=False) + "\n"

