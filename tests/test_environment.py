"""The pins: requirements.txt is the source of truth, environment.yml must list the same."""
from __future__ import annotations

import re
from importlib.metadata import version

import yaml

from data.paths import PROJECT_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)$")


def read_requirements() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = PIN.match(line)
            assert match, f"requirements.txt: {line!r} is not pinned with =="
            pins[match[1].lower()] = match[2]
    return pins


def test_environment_yml_lists_the_same_pins():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert python == ["python=3.11"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = {}
    for line in pip_section:
        match = PIN.match(line)
        assert match, f"environment.yml: {line!r} is not pinned with =="
        conda_pins[match[1].lower()] = match[2]
    assert conda_pins == read_requirements()


def test_installed_versions_match_the_pins():
    for name, pinned in read_requirements().items():
        installed = version(name)
        # torch's CPU wheel reports a local version such as 2.13.0+cpu.
        assert installed.split("+")[0] == pinned, f"{name}: installed {installed}, pinned {pinned}"


def test_numpy_and_pandas_satisfy_recbole():
    assert int(version("numpy").split(".")[0]) < 2 and int(version("pandas").split(".")[0]) < 3
