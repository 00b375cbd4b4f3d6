"""Status lines and progress bars go to stderr; bars only on a terminal; --quiet silences both."""

import os
import sys

from builder.artifact import file_table
from builder.console import configured, say


def _hash_a_file(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(bytes(1 << 20))
    file_table(tmp_path)


def test_progress_bars_show_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    with configured(quiet=False):
        _hash_a_file(tmp_path)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with configured(quiet=False):
        _hash_a_file(tmp_path)
    assert "Hashing files" in capsys.readouterr().err


def test_quiet_silences_status_lines_and_bars_then_restores(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with configured(quiet=True):
        say("building")
        _hash_a_file(tmp_path)
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert capsys.readouterr() == ("", "")
    assert "BUILDER_QUIET" not in os.environ and "TQDM_DISABLE" not in os.environ
    say("building")
    assert capsys.readouterr().err == "building\n"


def _bars_in_a_fresh_process(*, terminal: bool, quiet: bool = False) -> str:
    """What transformers and huggingface_hub decide about their bars in a CLI process set up by `configured`."""
    import pty
    import subprocess

    code = (
        "import sys\nfrom builder.console import configured\nwith configured(quiet=sys.argv[1] == '1'):\n"
        "    import huggingface_hub.utils as hub\n    from transformers.utils import logging\n"
        "    print(hub.are_progress_bars_disabled(), logging.is_progress_bar_enabled())\n"
    )
    primary, secondary = pty.openpty() if terminal else (None, subprocess.PIPE)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    done = subprocess.run(
        [sys.executable, "-c", code, "1" if quiet else "0"],
        stdout=subprocess.PIPE,
        stderr=secondary,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    if terminal:
        os.close(primary)
        os.close(secondary)
    return done.stdout.strip()


def test_library_bars_follow_the_terminal_and_quiet():
    assert _bars_in_a_fresh_process(terminal=True) == "False True"
    assert _bars_in_a_fresh_process(terminal=False) == "True False"
    assert _bars_in_a_fresh_process(terminal=True, quiet=True) == "True False"


def test_a_line_said_ahead_of_its_stage_follows_the_stage_line(capsys):
    from builder.console import begin_stage, end_stages

    say("verify: candidate: imports 1.0 s", stage="verify")  # no build under way (`builder verify`): at once
    begin_stage("quantize", "[2/4] quantize")
    say("verify: reference: imports 1.0 s", stage="verify")  # a gate run started during the quantize step
    say("verify: reference: load 0.5 s", stage="verify")
    begin_stage("verify", "[3/4] verify")
    say("verify: reference: evaluation 2.0 s", stage="verify")
    begin_stage("write", "[4/4] write")
    end_stages()
    assert capsys.readouterr().err.splitlines() == [
        "verify: candidate: imports 1.0 s",
        "[2/4] quantize",
        "[3/4] verify",
        "verify: reference: imports 1.0 s",
        "verify: reference: load 0.5 s",
        "verify: reference: evaluation 2.0 s",
        "[4/4] write",
    ]


def test_lines_of_a_stage_that_never_began_print_when_the_build_ends(capsys):
    from builder.console import begin_stage, end_stages

    begin_stage("quantize", "[2/4] quantize")
    say("verify: reference: imports 1.0 s", stage="verify")
    assert capsys.readouterr().err == "[2/4] quantize\n"
    end_stages()  # the quantize step failed
    assert capsys.readouterr().err == "verify: reference: imports 1.0 s\n"
