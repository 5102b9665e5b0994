"""ETSI GS QKD 014 V1.1.1 data formats, without any I/O.

Both sides of the key-delivery API use this module: the clients (:mod:`hybridkex.qkd.client`) parse
and strictly validate every KME answer with the ``parse_*`` functions, which raise
:class:`~hybridkex.qkd.errors.KMEResponseError`; the simulated KME (:mod:`hybridkex.qkd.kme`) parses
requests with the ``parse_*_request`` functions, which raise :class:`RequestRejected` carrying the
HTTP status and the message the spec mandates.  Clause and table numbers are the spec's.

The validators are hand-written rather than generated from the OpenAPI document: they enforce rules
a JSON schema cannot say (a key's decoded length equals the size asked for, key IDs unique within a
response and equal to those requested, canonical base64, strict JSON without duplicate members)
and raise the typed errors above with messages a user can act on.  The document itself is checked
against the KME's real answers in the tests (tests/qkd/openapicheck.py), so the two cannot drift.

Spec: https://www.etsi.org/deliver/etsi_gs/QKD/001_099/014/01.01.01_60/gs_qkd014v010101p.pdf
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import RemoteProtocolError
from .base import KeySourceStatus, QKDKey
from .errors import KMEResponseError

__all__ = [
    "API_PREFIX",
    "INT32_MAX",
    "MSG_BAD_REQUEST",
    "MSG_EXTENSION_MANDATORY_UNMET",
    "MSG_EXTENSION_MANDATORY_UNSUPPORTED",
    "MSG_EXTENSION_OPTIONAL_UNHANDLED",
    "MSG_KEYS_NOT_FOUND",
    "MSG_SERVER_ERROR",
    "MSG_SIZE_NOT_MULTIPLE_OF_8",
    "MSG_UNAUTHORIZED",
    "STATUS_CODES",
    "STATUS_FIELDS",
    "KMEStatus",
    "KeyRequest",
    "RequestRejected",
    "error_body",
    "is_uuid",
    "key_container_body",
    "key_ids_body",
    "key_request_body",
    "loads_strict",
    "parse_error_body",
    "parse_key_container",
    "parse_key_ids_query",
    "parse_key_ids_request",
    "parse_key_request",
    "parse_key_request_query",
    "parse_status",
    "sae_path",
]

#: Every endpoint lives under this path (cl. 5.1).
API_PREFIX = "/api/v1/keys"

#: The only HTTP status codes the spec defines (Tables 4, 6, 8).
STATUS_CODES = frozenset({200, 400, 401, 503})

# Status descriptions (Tables 4, 6, 8) and the messages mandated verbatim (cl. 6.2, 6.4).
MSG_BAD_REQUEST = "Bad request format."
MSG_UNAUTHORIZED = "Unauthorized."
MSG_SERVER_ERROR = "Error on server side."
MSG_SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXTENSION_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MSG_EXTENSION_MANDATORY_UNMET = "not all extension_mandatory request options could be met"
MSG_EXTENSION_OPTIONAL_UNHANDLED = "not all extension_optional request options handled"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"

#: The 11 required members of Status (Table 9); ``status_extension`` is the only optional one.
STATUS_FIELDS: tuple[str, ...] = (
    "source_KME_ID",
    "target_KME_ID",
    "master_SAE_ID",
    "slave_SAE_ID",
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)
_STATUS_STRINGS = STATUS_FIELDS[:4]
_STATUS_INTS = STATUS_FIELDS[4:]

#: JSON integers are kept within int32, which every KME implementation can represent.
INT32_MAX = 2**31 - 1

# The textual UUID form (8-4-4-4-12 hex digits); braces, URNs and bare hex are not key IDs.
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_uuid(value: object) -> bool:
    """True if ``value`` is a string in the textual UUID form (either case), as key IDs must be."""
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None


def sae_path(sae_id: str) -> str:
    """The URL-encoded form of an SAE ID for the request path (cl. 5.1: "URL-encoded SAE ID")."""
    return urllib.parse.quote(sae_id, safe="")


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python but never a JSON integer.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def loads_strict(data: bytes | str) -> Any:
    """Parse RFC 8259 JSON strictly: UTF-8, no NaN/Infinity, no duplicate members.

    Raises:
        ValueError: the text is not strict JSON (the callers turn this into their typed error).
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        return json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_unique_pairs)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


# --------------------------------------------------------------------------------------------------
# Client side: build requests, validate answers.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KMEStatus(KeySourceStatus):
    """The full ETSI 014 Status (Table 9): :class:`KeySourceStatus` plus the multicast limit."""

    max_sae_id_count: int = 0
    status_extension: Mapping[str, Any] | None = field(default=None, compare=False)


def key_request_body(
    number: int,
    size_bits: int,
    additional_slave_sae_ids: Sequence[str] = (),
    extension_mandatory: Sequence[Mapping[str, Any]] = (),
    extension_optional: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The Key request JSON object (Table 10) with explicit ``number`` and ``size``."""
    body: dict[str, Any] = {"number": number, "size": size_bits}
    if additional_slave_sae_ids:
        body["additional_slave_SAE_IDs"] = list(additional_slave_sae_ids)
    if extension_mandatory:
        body["extension_mandatory"] = [dict(e) for e in extension_mandatory]
    if extension_optional:
        body["extension_optional"] = [dict(e) for e in extension_optional]
    return body


def key_ids_body(key_ids: Iterable[str]) -> dict[str, Any]:
    """The Key IDs JSON object (Table 12)."""
    return {"key_IDs": [{"key_ID": k} for k in key_ids]}


def parse_error_body(obj: object) -> tuple[str | None, list[Any] | None]:
    """Best-effort reading of an Error object (Table 13): ``(message, details)``, ``None`` if absent."""
    if not isinstance(obj, dict):
        return None, None
    message = obj.get("message")
    details = obj.get("details")
    return (
        message if isinstance(message, str) else None,
        details if isinstance(details, list) else None,
    )


def parse_status(obj: object, *, master_sae_id: str | None, slave_sae_id: str, where: str) -> KMEStatus:
    """Validate a Status object (Table 9) and check it answers the question asked.

    ``master_sae_id`` is this SAE's ID (``None`` if unknown); ``slave_sae_id`` the one in the URL.

    Raises:
        KMEResponseError: a field is missing, has the wrong type or names other SAEs.
    """
    if not isinstance(obj, dict):
        raise KMEResponseError(f"{where}: Status is not a JSON object", status=200)
    missing = [f for f in STATUS_FIELDS if f not in obj]
    if missing:
        raise KMEResponseError(f"{where}: Status lacks required field(s) {', '.join(missing)}", status=200)
    for name in _STATUS_STRINGS:
        if not isinstance(obj[name], str) or not obj[name]:
            raise KMEResponseError(f"{where}: Status field {name} is not a non-empty string", status=200)
    for name in _STATUS_INTS:
        value = obj[name]
        if not _is_int(value) or not 0 <= value <= INT32_MAX:
            raise KMEResponseError(f"{where}: Status field {name} is not a non-negative integer", status=200)
    ext = obj.get("status_extension")
    if ext is not None and not isinstance(ext, dict):
        raise KMEResponseError(f"{where}: status_extension is not a JSON object", status=200)
    if obj["slave_SAE_ID"] != slave_sae_id:
        raise KMEResponseError(
            f"{where}: Status is for slave SAE {obj['slave_SAE_ID']!r}, asked for {slave_sae_id!r}", status=200
        )
    if master_sae_id is not None and obj["master_SAE_ID"] != master_sae_id:
        raise KMEResponseError(
            f"{where}: Status is for master SAE {obj['master_SAE_ID']!r}, but this SAE is {master_sae_id!r}",
            status=200,
        )
    if obj["key_size"] == 0 or obj["max_key_per_request"] == 0:
        raise KMEResponseError(f"{where}: Status reports key_size or max_key_per_request of 0", status=200)
    return KMEStatus(
        source_kme_id=obj["source_KME_ID"],
        target_kme_id=obj["target_KME_ID"],
        master_sae_id=obj["master_SAE_ID"],
        slave_sae_id=obj["slave_SAE_ID"],
        key_size=obj["key_size"],
        stored_key_count=obj["stored_key_count"],
        max_key_count=obj["max_key_count"],
        max_key_per_request=obj["max_key_per_request"],
        max_key_size=obj["max_key_size"],
        min_key_size=obj["min_key_size"],
        max_sae_id_count=obj["max_SAE_ID_count"],
        status_extension=ext,
    )


def _decode_key(text: object, *, where: str, index: int) -> bytes:
    if not isinstance(text, str):
        raise KMEResponseError(f"{where}: keys[{index}].key is not a string", status=200)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KMEResponseError(f"{where}: keys[{index}].key is not valid base64", status=200) from None
    # Strict RFC 4648: padded, canonical (no stray bits), so one key has exactly one encoding.
    if base64.b64encode(raw).decode("ascii") != text:
        raise KMEResponseError(f"{where}: keys[{index}].key is not canonical padded base64", status=200)
    return raw


def parse_key_container(
    obj: object,
    *,
    number: int,
    size_bits: int | None,
    where: str,
    expected_ids: Sequence[str] | None = None,
) -> list[QKDKey]:
    """Validate a Key container (Table 11) and return its keys.

    Checks that there are exactly ``number`` keys, every ``key_ID`` is a UUID, no ID repeats, every
    key is canonical base64 of exactly ``size_bits`` bits (``None``: all the same non-zero size), and
    for ``dec_keys`` (``expected_ids`` given) that exactly the requested IDs came back; the keys are
    then returned in the requested order.

    Raises:
        KMEResponseError: any violation.
    """
    if not isinstance(obj, dict):
        raise KMEResponseError(f"{where}: key container is not a JSON object", status=200)
    keys = obj.get("keys")
    if not isinstance(keys, list):
        raise KMEResponseError(f"{where}: key container has no 'keys' array", status=200)
    ext = obj.get("key_container_extension")
    if ext is not None and not isinstance(ext, dict):
        raise KMEResponseError(f"{where}: key_container_extension is not a JSON object", status=200)
    if len(keys) != number:
        raise KMEResponseError(f"{where}: KME returned {len(keys)} key(s), expected {number}", status=200)
    out: dict[str, QKDKey] = {}
    first_size: int | None = None
    for i, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise KMEResponseError(f"{where}: keys[{i}] is not a JSON object", status=200)
        key_id = entry.get("key_ID")
        if not is_uuid(key_id):
            raise KMEResponseError(f"{where}: keys[{i}].key_ID is not a UUID", status=200)
        assert isinstance(key_id, str)  # for mypy: is_uuid checked it
        for opt in ("key_ID_extension", "key_extension"):
            if entry.get(opt) is not None and not isinstance(entry[opt], dict):
                raise KMEResponseError(f"{where}: keys[{i}].{opt} is not a JSON object", status=200)
        raw = _decode_key(entry.get("key"), where=where, index=i)
        bits = len(raw) * 8
        if not raw:
            raise KMEResponseError(f"{where}: keys[{i}] (key_ID {key_id}) is empty", status=200)
        if size_bits is not None and bits != size_bits:
            raise KMEResponseError(
                f"{where}: key {key_id} has {bits} bits, requested {size_bits}", status=200
            )
        if first_size is not None and bits != first_size:
            raise KMEResponseError(f"{where}: keys in one container differ in size", status=200)
        first_size = bits
        canonical = key_id.lower()
        if canonical in out:
            raise KMEResponseError(f"{where}: key_ID {key_id} appears twice in one answer", status=200)
        out[canonical] = QKDKey(key_id, raw)
    if expected_ids is None:
        return list(out.values())
    wanted = [k.lower() for k in expected_ids]
    if set(wanted) != set(out):
        extra = sorted(set(out) - set(wanted))
        raise KMEResponseError(
            f"{where}: KME returned key IDs other than those requested (unexpected: {', '.join(extra)})",
            status=200,
        )
    return [out[k] for k in wanted]


# --------------------------------------------------------------------------------------------------
# KME side: parse requests, build answers.
# --------------------------------------------------------------------------------------------------


class RequestRejected(RemoteProtocolError):
    """The KME must refuse a request: carries the HTTP ``status`` and the Error ``details``.

    The message is what goes into the Error object's ``message`` (the spec's wording where it
    mandates one); it never contains key material.  ``retry_after`` (seconds) suggests when a 503
    may succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        details: Sequence[Mapping[str, Any]] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.details = [dict(d) for d in details]
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A parsed Key request (Table 10); ``None`` means "use the KME's default"."""

    number: int | None = None
    size: int | None = None
    additional_slave_sae_ids: tuple[str, ...] = ()
    extension_mandatory: tuple[Mapping[str, Any], ...] = ()
    extension_optional: tuple[Mapping[str, Any], ...] = ()


_KEY_REQUEST_FIELDS = frozenset(
    {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"}
)


def _request_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise RequestRejected(f"{name} must be an integer")
    assert isinstance(value, int)
    if not 0 <= value <= INT32_MAX:
        raise RequestRejected(f"{name} is out of range")
    return value


def _extensions(name: str, value: object) -> tuple[Mapping[str, Any], ...]:
    # Extensions are arrays of single-pair objects (cl. 6.2), e.g. [{"abc_route_type": "direct"}].
    if not isinstance(value, list) or not all(isinstance(e, dict) and len(e) == 1 for e in value):
        raise RequestRejected(f"{name} must be an array of single-member objects")
    return tuple(value)


def parse_key_request(obj: object) -> KeyRequest:
    """Parse the JSON body of a POST ``enc_keys`` (Table 10). ``{}`` is valid (all defaults).

    Unknown members are refused rather than ignored, so a misspelt ``nubmer`` cannot silently turn
    into the default of one key.

    Raises:
        RequestRejected: 400 with a message naming the problem.
    """
    if not isinstance(obj, dict):
        raise RequestRejected("key request must be a JSON object")
    unknown = sorted(set(obj) - _KEY_REQUEST_FIELDS)
    if unknown:
        raise RequestRejected(f"unknown member(s) in key request: {', '.join(unknown)}")
    number = _request_int("number", obj["number"]) if "number" in obj else None
    size = _request_int("size", obj["size"]) if "size" in obj else None
    extra: tuple[str, ...] = ()
    if "additional_slave_SAE_IDs" in obj:
        ids = obj["additional_slave_SAE_IDs"]
        if not isinstance(ids, list) or not all(isinstance(s, str) and s for s in ids):
            raise RequestRejected("additional_slave_SAE_IDs must be an array of non-empty strings")
        extra = tuple(ids)
    mandatory = _extensions("extension_mandatory", obj["extension_mandatory"]) if "extension_mandatory" in obj else ()
    optional = _extensions("extension_optional", obj["extension_optional"]) if "extension_optional" in obj else ()
    return KeyRequest(number, size, extra, mandatory, optional)


def _single_query_int(name: str, values: list[str]) -> int:
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 10:
        raise RequestRejected(f"query parameter {name} must appear once, as a decimal integer")
    return _request_int(name, int(values[0]))


def parse_key_request_query(params: Iterable[tuple[str, str]]) -> KeyRequest:
    """Parse the query of a GET ``enc_keys`` (cl. 6.2): nothing, or only ``number`` and ``size``.

    Raises:
        RequestRejected: 400 for any other parameter ("anything else shall use POST").
    """
    seen: dict[str, list[str]] = {}
    for name, value in params:
        seen.setdefault(name, []).append(value)
    unknown = sorted(set(seen) - {"number", "size"})
    if unknown:
        raise RequestRejected(
            f"GET enc_keys accepts only number and size (got {', '.join(unknown)}); use POST for the rest"
        )
    number = _single_query_int("number", seen["number"]) if "number" in seen else None
    size = _single_query_int("size", seen["size"]) if "size" in seen else None
    return KeyRequest(number, size)


def _key_id(value: object) -> str:
    if not is_uuid(value):
        raise RequestRejected("key_ID must be a UUID string")
    assert isinstance(value, str)
    return value.lower()


def parse_key_ids_request(obj: object) -> list[str]:
    """Parse the JSON body of a POST ``dec_keys`` (Table 12) into lower-case key IDs.

    Vendor members inside a ``key_IDs`` entry (e.g. ``master_SAE_ID``) are tolerated; the key IDs
    must be UUIDs, at least one, none repeated.

    Raises:
        RequestRejected: 400 with a message naming the problem.
    """
    if not isinstance(obj, dict):
        raise RequestRejected("key IDs request must be a JSON object")
    unknown = sorted(set(obj) - {"key_IDs", "key_IDs_extension"})
    if unknown:
        raise RequestRejected(f"unknown member(s) in key IDs request: {', '.join(unknown)}")
    entries = obj.get("key_IDs")
    if not isinstance(entries, list) or not entries:
        raise RequestRejected("key_IDs must be a non-empty array")
    ext = obj.get("key_IDs_extension")
    if ext is not None and not isinstance(ext, dict):
        raise RequestRejected("key_IDs_extension must be a JSON object")
    ids: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict) or "key_ID" not in entry:
            raise RequestRejected("each key_IDs entry must be an object with a key_ID")
        ids.append(_key_id(entry["key_ID"]))
    if len(set(ids)) != len(ids):
        raise RequestRejected("a key_ID is repeated in the request")
    return ids


def parse_key_ids_query(params: Iterable[tuple[str, str]]) -> list[str]:
    """Parse the query of a GET ``dec_keys``: exactly one ``key_ID`` (cl. 6.4).

    Raises:
        RequestRejected: 400 for anything else.
    """
    items = list(params)
    if len(items) != 1 or items[0][0] != "key_ID":
        raise RequestRejected("GET dec_keys takes exactly one key_ID query parameter; use POST for more")
    return [_key_id(items[0][1])]


def error_body(message: str, details: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """An Error object (Table 13)."""
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = [dict(d) for d in details]
    return body


def key_container_body(keys: Iterable[QKDKey]) -> dict[str, Any]:
    """A Key container (Table 11) with standard padded base64 keys."""
    return {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.key).decode("ascii")} for k in keys]}
