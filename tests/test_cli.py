import subprocess
import sys

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
