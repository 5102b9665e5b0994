"""``hybridkex kme|demo --link bb84`` options: every bad value is one line on stderr and a non-zero exit."""

from __future__ import annotations

import pytest

from hybridkex.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["--link", "bb84", "--eavesdrop", "foo"], "--eavesdrop: 'foo': expected intercept-resend:FRACTION"),
    (["--link", "bb84", "--eavesdrop", "intercept-resend:1.5"], "--eavesdrop"),
    (["--link", "bb84", "--distance-km", "250"], "gives no secret key"),
    (["--link", "bb84", "--distance-km", "-1"], "--distance-km: must be between 0 and 300 km"),
    (["--link", "bb84", "--mitm", "flip:2"], "--mitm: 'flip:2': expected flip:FRACTION or drop:FRACTION"),
    (["--link", "bb84", "--pulses-per-block", "12.5"], "--pulses-per-block"),
    (["--link", "bb84", "--pulse-speedup", "-1"], "--pulse-speedup"),
    (["--link", "bb84", "--link-bootstrap", "/nonexistent/secret"], "cannot read /nonexistent/secret"),
    (["--mitm", "flip:0.1"], "--mitm: needs --link bb84"),
    (["--eavesdrop", "intercept-resend:0.1"], "--eavesdrop: needs --link bb84"),
])
@pytest.mark.parametrize("command", [["kme", "--pki", "/nonexistent"], ["demo"]])
def test_bad_link_options_are_one_line_errors(command: list[str], argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_short_bootstrap_file_is_refused_before_anything_starts(tmp_path: object,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "boot.bin"  # type: ignore[operator]
    secret.write_bytes(b"\x07" * 100)
    assert main(["kme", "--pki", "/nonexistent", "--link", "bb84", "--link-bootstrap", str(secret)]) != 0
    err = capsys.readouterr().err
    assert "holds 800 bits; the first two blocks need 1792" in err
