"""Stage plumbing: params, clean errors, own peak RSS (atomic output folders: tests/core/test_files.py)."""

import subprocess
import sys

import pytest

from stages.errors import StageError
from stages.runtime import load_params, run_stage


def test_load_params_names_the_missing_section(tmp_path):
    (tmp_path / "params.yaml").write_text("merge:\n  shard_size_mb: 10\n")
    assert load_params("merge", tmp_path / "params.yaml") == {"shard_size_mb": 10}
    with pytest.raises(StageError, match="no `verify:` section"):
        load_params("verify", tmp_path / "params.yaml")


def test_stage_error_exits_1_with_message_only(capsys):
    def main(item_id):
        raise StageError("LORA_UNPLACED", f"{item_id}: cannot place key x")

    with pytest.raises(SystemExit) as exc:
        run_stage("merge", main, ["demo"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "error: stage merge@demo: [LORA_UNPLACED] demo: cannot place key x" in err
    assert "Traceback" not in err


def test_peak_rss_is_the_stage_own_not_the_parent():
    # The child allocates ~200 MiB before exec-ing a Python that resets and measures: ru_maxrss would
    # carry the 200 MiB across exec, VmHWM after the reset does not.
    code = (
        "import os, sys; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
        "os.execv(sys.executable, [sys.executable, '-c', "
        "'from stages.runtime import reset_peak_rss, peak_rss_mb; reset_peak_rss(); print(peak_rss_mb())'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) < 150, out
