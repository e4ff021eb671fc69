"""Run-wide state of a stage: the wandb run it logs to."""
from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.runs import RunLogger


def test_a_stage_never_logs_into_the_open_run_of_one_that_failed_before_it(tmp_path):
    """Offline wandb, two stages in one process, the first ended by an error before it finished its
    run (the report calls a busy stage again): the second gets a run of its own, in its own folder."""
    def config(seed):
        return OmegaConf.create({"logger": {"mode": "offline", "project": "taesar-test", "entity": None},
                                 "dataset": {"name": "tiny"}, "seed": seed})

    failed = RunLogger(config(1), tmp_path / "first", job="pretrain")  # never finished
    second = RunLogger(config(2), tmp_path / "second", job="pretrain")
    try:
        assert second.run.id != failed.run.id and second.run.name == "pretrain-tiny-2"
        assert second.run.config["seed"] == 2 and str(tmp_path / "second") in second.run.dir
    finally:
        second.finish({})


def test_an_offline_run_makes_no_name_lookup_or_network_connection(tmp_path):
    """In a fresh process (audit hooks cannot be removed), an offline run's main process opens no
    internet socket and resolves no name: Python reports every `socket.getaddrinfo`, `gethostbyname`,
    `gethostbyaddr` and `connect` to an audit hook (a Unix socket to wandb-core is fine); wandb's
    error reporting, what would reach its servers from wandb-core, is off."""
    import json
    import os
    import subprocess
    import sys

    from data.paths import PROJECT_ROOT

    script = f"""
import json, os, socket, sys
seen = []
def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto",
                 "socket.sendmsg") or (event == "socket.connect" and args[0].family != socket.AF_UNIX):
        seen.append(event)
sys.addaudithook(hook)
from omegaconf import OmegaConf
from pipeline.runs import RunLogger
cfg = OmegaConf.create({{"logger": {{"mode": "offline", "project": "p", "entity": None}},
                        "dataset": {{"name": "tiny"}}, "seed": 1}})
logger = RunLogger(cfg, __import__("pathlib").Path({str(tmp_path)!r}), job="pretrain")
logger.log({{"loss": 1.0}})
logger.finish({{"loss": 1.0}})
print(json.dumps({{"seen": seen, "error_reporting": os.environ.get("WANDB_ERROR_REPORTING")}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_ERROR_REPORTING"}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"seen": [], "error_reporting": "false"}
