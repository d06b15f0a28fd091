"""The CLI's error boundary: bad input is one line, a bug says it is one (its traceback under -v)."""

import errno

import pytest

from scalekd import cli


def _failing(exc):
    def command(args):
        raise exc

    return command


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_exception_is_reported_as_a_bug_with_its_traceback_under_verbose(monkeypatch, capsys, verbose):
    monkeypatch.setattr(cli, "cmd_config", _failing(ValueError("tensor of shape [3] cannot be reshaped")))
    rc = cli.main((["-v"] if verbose else []) + ["config", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 70
    assert "internal error, a bug in scalekd: ValueError: tensor of shape [3]" in err
    assert ("Traceback (most recent call last)" in err) == verbose


def test_a_full_disk_is_one_line_naming_the_path_not_a_bug(monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.pt")
    monkeypatch.setattr(cli, "cmd_config", _failing(full))
    assert cli.main(["config", "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "/data/out/model.pt" in err


def test_a_bugs_message_and_traceback_carry_no_credentials(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_config", _failing(RuntimeError("GET http://admin:hunter2@s3.local/b failed")))
    assert cli.main(["-v", "config", "--preset", "tiny"]) == 70
    err = capsys.readouterr().err
    assert "hunter2" not in err and "***@s3.local" in err
