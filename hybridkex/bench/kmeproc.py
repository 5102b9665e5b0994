"""The simulated KME pair as a process of its own (``hybridkex kme``), for the benchmark.

In a deployment the KMEs are other machines. Run in the benchmark's own process (a thread, as
:class:`~hybridkex.qkd.kme.SimulatedKMEPair` does), every KME request of a loopback measurement
would compete for that process's interpreter lock with the server it serves: a cost of the
benchmark, not of hybridkex. So the loopback and throughput phases talk to a KME process; it still
shares the machine's cores, which the method notes say.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Final

from ..exceptions import ConfigurationError
from ..qkd.client import ETSI014Client, certificate_common_name
from ..qkd.pki import DemoPKI

__all__ = ["KMEProcessPair"]

#: The SAE each KME serves (the kme command's defaults).
_SAE_KME: Final = {"sae-a": "a", "sae-b": "b"}
_URL = re.compile(r"(KME-[AB]) (https://\S+)")


class KMEProcessPair:
    """``python -m hybridkex kme`` on free loopback ports, with the pair's PKI; :meth:`stop` ends it.

    The same surface as :class:`~hybridkex.qkd.kme.SimulatedKMEPair` that the benchmark uses:
    ``url_for``, ``key_source``, ``kme_id_a``/``kme_id_b``, ``pki``.
    """

    def __init__(self, pki: DemoPKI, *, delay_ms: int = 0) -> None:
        self.pki = pki
        env = dict(os.environ)
        # The KME process imports the same hybridkex as this one, even from a source tree.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop(); a file never blocks the KME
        self._proc = subprocess.Popen(  # noqa: S603 - this package's own CLI, fixed arguments
            [sys.executable, "-m", "hybridkex", "kme", "--pki", str(pki.directory), "--port-a", "0", "--port-b", "0",
             "--delay-ms", str(delay_ms), "--log-level", "error",
             # A link that is never the bottleneck: the benchmark is about handshakes, not key rates.
             "--rate", str(10**12), "--capacity", str(1 << 40)],
            stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True)
        urls: dict[str, str] = {}
        assert self._proc.stdout is not None
        while len(urls) < 2:
            line = self._proc.stdout.readline()
            if not line:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")
                self.stop()
                raise ConfigurationError(f"the simulated KME process did not start: {err.strip()[-300:]}",
                                         field="kme")
            if m := _URL.match(line):
                urls[m.group(1)] = m.group(2)
        self.url_a, self.url_b = urls["KME-A"], urls["KME-B"]
        self.kme_id_a = certificate_common_name(pki.cert("kme-a"))
        self.kme_id_b = certificate_common_name(pki.cert("kme-b"))

    def __repr__(self) -> str:
        return f"KMEProcessPair(url_a={self.url_a!r}, url_b={self.url_b!r}, pid={self._proc.pid})"

    def url_for(self, sae_id: str) -> str:
        side = _SAE_KME.get(sae_id)
        if side is None:
            raise ConfigurationError(f"the simulated KME pair serves sae-a and sae-b, not {sae_id!r}", field="sae_id")
        return self.url_a if side == "a" else self.url_b

    def key_source(self, sae_id: str, **kwargs: Any) -> ETSI014Client:
        url = self.url_for(sae_id)
        kme_id = self.kme_id_a if url == self.url_a else self.kme_id_b
        return ETSI014Client(url, cert=self.pki.cert(sae_id), key=self.pki.key(sae_id), ca=self.pki.ca_cert,
                             sae_id=sae_id, kme_id=kme_id, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (idempotent)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()
