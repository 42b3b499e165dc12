import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from paramshare.cli import add_report_arguments

from .conftest import ROOT


def paramshare(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "paramshare.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_count_prints_tied_and_untied_unique_parameters():
    proc = paramshare("count")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in proc.stdout.splitlines()[1:]}
    assert rows["conv"] == ["211,690", "2,265,610"]
    assert rows["recurrent"] == ["61,962", "1,700,106"]
    assert rows["mlp"][0] == rows["mlp"][1]


def test_check_validates_and_exits_non_zero_on_bad_params(tmp_path):
    assert paramshare("check").returncode == 0
    bad = tmp_path / "params.yaml"
    bad.write_text("variants: [conv, lstm]\n")
    proc = paramshare("check", "--params", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: params: variants: unknown variant 'lstm'; "
                                   "allowed: conv, recurrent, attention, soft, mlp")


def test_report_arguments_collect_tags_and_refuses_malformed_ones(capsys):
    parser = argparse.ArgumentParser(prog="paramshare report")
    add_report_arguments(parser)
    args = parser.parse_args(["--tag", "family=conv", "--tag", "dvc_exp_name=a=b", "--commit", "a1b2c3d"])
    assert args.tags == {"family": "conv", "dvc_exp_name": "a=b"} and args.commit == "a1b2c3d"
    assert args.out == Path("reports") and args.experiment is None and args.filter_string is None
    for bad in (["--tag", "family"], ["--tag", "=conv"], ["--commit", "xyz"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_a_signal_during_a_store_write_is_raised_when_the_write_is_done():
    import os
    import signal

    from paramshare import signals

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signals.install()
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("write")
        assert finished == ["write"]
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append("not reached")
        assert finished == ["write"]
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
