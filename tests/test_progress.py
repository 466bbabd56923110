"""Progress in its three modes: rich bars on a terminal, plain timestamped lines in a log, nothing with
EFFIDEPLOY_PROGRESS=0 (what every other test runs under, since they read stderr for one-line errors)."""

import re

import pytest

from effideploy import progress
from tests.test_cli import run_cli

STAMP = r"^\[\d\d:\d\d:\d\d\] "


@pytest.mark.parametrize("setting, tty, expected", [
    ("0", True, "off"), ("1", False, "bars"), ("plain", True, "plain"), (None, True, "bars"), (None, False, "plain"),
])
def test_mode_follows_the_switch_then_the_terminal(monkeypatch, setting, tty, expected):
    if setting is None:
        monkeypatch.delenv("EFFIDEPLOY_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("EFFIDEPLOY_PROGRESS", setting)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: tty)
    assert progress.mode() == expected
    assert progress.enabled() == (expected == "bars")


def test_plain_lines_say_start_progress_and_end(monkeypatch, capsys):
    monkeypatch.setenv("EFFIDEPLOY_PROGRESS", "plain")
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # every step reports
    assert list(progress.track(range(3), "Counting")) == [0, 1, 2]
    with progress.Bar("Training", total=2) as bar:
        bar.advance(status="loss 1.5")
        bar.advance(status="loss 1.2")
    with progress.status("Writing"):
        pass
    with pytest.raises(ValueError), progress.status("Failing"):
        raise ValueError("boom")
    lines = capsys.readouterr().err.splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    text = [re.sub(STAMP, "", line) for line in lines]
    assert text[:5] == ["Counting ... (0/3)", *[f"Counting: {n}/3, 0 s" for n in (1, 2, 3)],
                        "Counting: done in 0.0 s"]
    assert text[5:8] == ["Training ... (0/2)", "Training: 1/2, 0 s, loss 1.5", "Training: 2/2, 0 s, loss 1.2"]
    assert re.fullmatch(r"Training: done in \d+\.\d s, loss 1\.2", text[8])
    assert text[9] == "Writing ..." and re.fullmatch(r"Writing: done in \d+\.\d s", text[10])
    assert text[11:] == ["Failing ..."]  # a failed step adds nothing: its error line follows


def test_a_command_in_a_log_reports_its_phases_without_bars(tmp_path, tiny_model_dir, calib_file):
    """What a CI log of `effideploy prune` shows: timestamped phase lines, no redrawn bar (\\r, rich glyphs)."""
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "2",
                           "--calib-seqlen", "32", "--sparsity", "0.5", "--output", tmp_path / "pruned",
                           env={"EFFIDEPLOY_PROGRESS": "plain"})
    assert code == 0, err
    assert re.search(STAMP + r"Calibrating blocks \.\.\. \(0/\d+\)$", err, re.M), err
    assert re.search(STAMP + r"Writing pruned blocks: done in \d+\.\d s$", err, re.M), err
    assert "\r" not in err and "━" not in err and "it/s" not in err
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "2",
                           "--calib-seqlen", "32", "--sparsity", "0.5", "--output", tmp_path / "quiet")
    assert code == 0 and "Calibrating" not in err  # EFFIDEPLOY_PROGRESS=0: nothing
