#!/usr/bin/env bash
# The test command: sets up .venv/ on first use, then runs the test suite
# (slow end-to-end tests excluded; `bash test.sh -m slow` runs those).
source "$(dirname "$0")/scripts/venv.sh"
exec python -m pytest -m "not slow" "$@"
