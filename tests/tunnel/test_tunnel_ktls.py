"""kTLS detection against the real kernel and pyOpenSSL of this machine (issue 15): optional,
detected, reported, never required.  The tunnel's listening line and the benchmark JSON carrying
the answer are checked in test_tunnel_fastpath.py and tests/bench/test_tunnel_bench.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from OpenSSL import SSL

from hybridkex.tunnel.ktls import NOT_USED, ULP_FILE, detect, ktls_status, probe_kernel, probe_openssl


def _listed_ulps() -> list[str]:
    try:
        return ULP_FILE.read_text(encoding="ascii").split()
    except OSError:
        return []


def test_the_kernel_answer_matches_what_the_kernel_lists() -> None:
    answer, reason, detail = probe_kernel()
    if answer == "available":
        # A ULP the kernel attached is registered, so the kernel lists it after the probe.
        assert "tls" in _listed_ulps(), detail
        assert reason == "kernel attaches the tls ULP"
    else:
        # This machine's kernel has no tls module: the probe's setsockopt says ENOENT (the reason
        # adds how to load one where a module is installed but not loaded).
        assert answer == "unavailable" and reason.startswith("kernel has no tls ULP"), (reason, detail)
        assert "setsockopt(TCP_ULP, 'tls') on a connected TCP socket: ENOENT" in detail
        assert "tls" not in _listed_ulps()
    if ULP_FILE.exists():
        assert f"tcp_available_ulp: {' '.join(_listed_ulps()) or '(empty)'}" in detail


def test_the_status_is_cached_reported_in_one_line_and_never_used() -> None:
    status = ktls_status()
    assert ktls_status() is status
    assert status.used is False and status.not_used_reason == NOT_USED
    assert "memory BIOs" in NOT_USED
    if status.kernel == "unavailable":
        assert status.summary == f"unavailable: {status.kernel_reason}"
        assert status.summary.startswith("unavailable: kernel has no tls ULP")
    else:
        assert status.summary == "available in the kernel, not used: the tunnel's TLS runs on memory BIOs"
    assert "\n" not in status.summary
    as_dict = json.loads(json.dumps(status.as_dict()))
    assert as_dict["summary"] == status.summary and as_dict["kernel"] == status.kernel
    assert set(as_dict) == {"summary", "kernel", "kernel_reason", "kernel_detail", "openssl", "used",
                            "not_used_reason"}


def test_pyopenssl_is_asked_through_public_names_only() -> None:
    answer = probe_openssl()
    if getattr(SSL, "OP_ENABLE_KTLS", None) is None:
        assert answer.startswith("not exposed by pyOpenSSL "), answer
    else:
        assert answer.startswith("SSL.OP_ENABLE_KTLS exposed by pyOpenSSL"), answer
    assert SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode() in answer


def test_a_probe_that_cannot_run_answers_unknown_and_does_not_raise() -> None:
    # 192.0.2.1 (TEST-NET-1) is no local address: the probe's listener cannot bind, a real failure.
    host = "192.0.2.1"
    status = detect(host=host)
    assert status.kernel == "unknown"
    assert status.summary.startswith(f"unknown: cannot open a TCP connection on {host} to probe: "), status
    assert status.used is False


def test_an_unreadable_ulp_list_is_a_detail_not_a_failure(tmp_path: Path) -> None:
    answer, _, detail = probe_kernel(ulp_file=tmp_path / "tcp_available_ulp")
    assert answer == ktls_status().kernel
    assert "tcp_available_ulp: not readable (FileNotFoundError)" in detail


def test_a_refused_ulp_with_an_installed_module_says_how_to_load_it(tmp_path: Path) -> None:
    # A modules.dep as depmod writes it, naming a tls module: the kernel here still refuses the ULP
    # (no module is loaded), and the reason says that the installed one could be.
    release = tmp_path / os.uname().release
    release.mkdir()
    (release / "modules.dep").write_text("kernel/net/ipv4/tcp_bbr.ko.xz:\nkernel/net/tls/tls.ko.zst:\n")
    answer, reason, _ = probe_kernel(modules_dir=tmp_path)
    if ktls_status().kernel == "available":
        assert (answer, reason) == ("available", "kernel attaches the tls ULP")
    else:
        assert answer == "unavailable" and reason.startswith("kernel has no tls ULP loaded (a tls module is installed")
    (release / "modules.dep").write_text("kernel/net/tls_other/tlsx.ko:\n")
    if answer == "unavailable":
        assert probe_kernel(modules_dir=tmp_path)[1] == "kernel has no tls ULP"
