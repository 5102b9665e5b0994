"""A client whose authentication the server refuses after the client's last hybrid message.

The client starts TLS right after its Finished; the server answers with an Abort frame instead of
TLS.  The client must report the peer's verdict (authentication failed), not a TLS parse error, on
the blocking and the asyncio API alike.
"""

from __future__ import annotations

import asyncio

import iohelpers as h
import pytest

import hybridkex
from hybridkex.api import ClientConfig, HybridServer
from hybridkex.exceptions import AuthenticationError, TLSError
from hybridkex.protocol import InitiatorConfig, PKIAuthenticator


def _rogue_client_config(setup: h.Setup) -> ClientConfig:
    """Trusts the real CA, but presents a certificate from another CA (the server refuses it)."""
    real_ca = h._PKI["ca"][0]
    saved = dict(h._PKI)
    h._PKI.clear()
    try:
        rogue = h.pki_authenticator(h.CLIENT_ID, "client")
    finally:
        h._PKI.clear()
        h._PKI.update(saved)
    cred = next(iter(rogue._creds.values()))
    ini = setup.client.handshake
    return ClientConfig(InitiatorConfig(h.CLIENT_ID, (PKIAuthenticator([real_ca], ed25519=cred),), ini.policy,
                                        ini.qkd, peer_identity=h.SERVER_ID))


def test_blocking_client_is_told_authentication_failed() -> None:
    setup = h.make_setup(auth="pki")
    bad = _rogue_client_config(setup)
    with HybridServer(("127.0.0.1", 0), setup.server, lambda c, a: None, key_source=setup.server_keys).start() as srv:
        with pytest.raises(AuthenticationError) as info:
            hybridkex.connect(("127.0.0.1", srv.server_address[1]), bad, key_source=setup.client_keys)
        assert not isinstance(info.value, TLSError)


def test_asyncio_client_is_told_authentication_failed() -> None:
    setup = h.make_setup(auth="pki")
    bad = _rogue_client_config(setup)

    async def main() -> None:
        async def handler(reader: object, writer: object) -> None:
            raise AssertionError("the handler must never run for a refused client")

        server = await hybridkex.start_server(handler, "127.0.0.1", 0, setup.server, key_source=setup.server_keys)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(AuthenticationError):
                await hybridkex.open_connection("127.0.0.1", port, bad, key_source=setup.client_keys)

    asyncio.run(main())
