"""The exception tree: one root, a local/remote split, opaque authentication failures."""

from __future__ import annotations

import inspect

import pytest

import hybridkex
from hybridkex import exceptions


def test_single_root() -> None:
    classes = [obj for _, obj in inspect.getmembers(exceptions, inspect.isclass)
               if issubclass(obj, Exception) and obj.__module__ == exceptions.__name__]
    assert classes
    for cls in classes:
        assert issubclass(cls, exceptions.HybridKEXError), cls
        assert cls.__name__ in exceptions.__all__, f"{cls.__name__} missing from exceptions.__all__"
        assert getattr(hybridkex, cls.__name__) is cls, f"{cls.__name__} not exported"
        assert cls.__name__ in hybridkex.__all__


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError):
        exceptions.ProtocolError("x")
    assert issubclass(exceptions.VersionError, exceptions.RemoteProtocolError)
    assert not issubclass(exceptions.LocalProtocolError, exceptions.RemoteProtocolError)


def test_authentication_error_is_uninformative() -> None:
    a = exceptions.AuthenticationError("wrong PSK for identity 'alice'")
    b = exceptions.AuthenticationError("certificate expired")
    assert str(a) == str(b) == "authentication failed"
    assert a.detail != b.detail


def test_configuration_error_is_value_error_and_names_field() -> None:
    err = exceptions.ConfigurationError("must be >= 32 bytes", field="psk")
    assert isinstance(err, ValueError)
    assert str(err) == "psk: must be >= 32 bytes" and err.field == "psk"


def test_exit_codes_distinct_per_family() -> None:
    codes = {cls.exit_code for cls in (exceptions.ConfigurationError, exceptions.UnsupportedAlgorithm,
                                       exceptions.RemoteProtocolError, exceptions.AuthenticationError,
                                       exceptions.PolicyViolation, exceptions.KeySourceError,
                                       exceptions.TLSError, exceptions.HandshakeTimeout)}
    assert len(codes) == 8 and 0 not in codes
