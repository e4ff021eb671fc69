"""The GPU check's dry run: without CUDA (or with --dry-run) every step of the check runs on the CPU
with tiny data, the table is written, and the command exits 0."""
import subprocess
import sys

from data.paths import PROJECT_ROOT


def test_the_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a dry run of the same steps on the CPU" in done.stdout
    table = out.read_text()
    for row in ("| device | CPU (dry run)", "| device tests | passed", "| ACDT decisions, device against CPU | identical",
                "decoding, 1 target(s) in one pass", "decoding, 4 target(s) in one pass",
                "training epoch, Taesar decoder", "training epoch, RecBole SASRec", "training step, ABXI",
                "training step, CGRec", "training step, SyNCRec"):
        assert row in table, row
