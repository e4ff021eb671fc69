#!/usr/bin/env bash
# The test command: sets up .venv/ on first use, then runs the test suite
# (slow end-to-end tests excluded; `bash test.sh -m slow` runs those). It also installs the
# optional cluster launchers (requirements-cluster.txt), whose configs the tests compose.
EXTRA_REQUIREMENTS="requirements-cluster.txt" source "$(dirname "$0")/scripts/venv.sh"
exec python -m pytest -m "not slow" "$@"
