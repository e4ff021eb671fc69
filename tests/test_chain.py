"""The whole chain on tiny synthetic data: prepare, pretrain, decode, fine-tune, report."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from data.paths import PROJECT_ROOT
from decoding import run_decoding
from finetune import run_finetune
from pipeline.artifacts import regenerated, stage1_paths
from pretrain import run_pretrain
from results import main as results_main
from tests.conftest import TINY_MODEL, stage_config, tiny_overrides

STAGES = ["seed=2025", "trainer.base.epochs=2", "trainer.expert.epochs=1", "trainer.finetune.epochs=2"]


def test_smoke_chain_writes_every_output(tmp_path):
    overrides = [*STAGES, *tiny_overrides(tmp_path)]
    run_pretrain(stage_config("pretrain", overrides))
    paths = stage1_paths(stage_config("pretrain", overrides))
    assert paths.base.is_file() and all(paths.expert(f"dom{d}").is_file() for d in (1, 2, 3))
    data = tmp_path / "data" / "tiny"
    assert (data / "tiny.item").is_file() and (data / "manifest.json").is_file()
    for target in ("dom1", "dom2", "dom3"):
        cfg = stage_config("decoding", [f"target_dom={target}", *overrides])
        run_decoding(cfg)
        output = regenerated(cfg)
        for path in (output.inter, output.summary, output.mapping, output.manifest):
            assert path.is_file() and path.name.startswith(f"tiny.2025.{target}.train.")
    runs = tmp_path / "runs"
    for target in ("dom1", "dom2", "dom3"):
        for train_type in ("new", "sim", "full"):
            run_dir = runs / f"{target}-{train_type}"
            metrics = run_finetune(stage_config("finetune", [f"train_type={train_type}", f"target_dom={target}",
                                                        *overrides, *TINY_MODEL, f"run_dir={run_dir}"]))
            assert json.loads((run_dir / "metrics.json").read_text()) == metrics
            for split in ("valid", "test"):
                assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in metrics[split].values())
    results_main([str(runs), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "table.md").read_text().splitlines()
    assert len(table) == 2 + 3 and all(f"{d} NDCG@10" in table[0] for d in ("dom1", "dom2", "dom3"))
    assert (tmp_path / "report" / "table.csv").is_file()


@pytest.mark.slow
def test_run_sh_on_synthetic_data(tmp_path):
    """`bash run.sh` itself, on the tiny dataset with the debug preset and short trainings."""
    env = {**os.environ, "DATASET": "tiny", "DOMAINS": "dom1"}
    result = subprocess.run(["bash", "run.sh", "debug=tiny", "trainer.base.epochs=2", "trainer.expert.epochs=1",
                             "trainer.finetune.epochs=2", "model.hidden_size=16", "model.inner_size=16",
                             "finetune:eval_batch_size=512", "logger.mode=disabled", "progress=false"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| dataset | model | train |" in result.stdout
    run = sorted((PROJECT_ROOT / "outputs" / "run.sh" / "tiny").iterdir())[-1]
    for name in ("table.md", "table.csv", "ndcg10.png", "analysis/seed_2025/diagnostics_dom1.png",
                 "analysis/seed_2025/diagnostics_dom1.json", "analysis/seed_2025/mapping_dom1.png"):
        assert (run / name).is_file(), name


def test_run_sh_refuses_an_official_key_that_names_no_training(tmp_path):
    """`bash run.sh epochs=50` would change Stage I and Stage III at once: it stops and says how to
    name one (before any stage runs)."""
    result = subprocess.run(["bash", "run.sh", "epochs=50"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "trainer.base.epochs=... (Stage I, base model)" in result.stderr
    assert "trainer.finetune.epochs=... (Stage III)" in result.stderr and "== data preparation" not in result.stdout
