#!/usr/bin/env bash
# One script, two verbs, each doing its own set-up on a fresh Debian/Ubuntu machine (Python 3.10+):
#   ./quickstart.sh job    run the main job: the pipeline on full Fashion-MNIST (pipelines/configs/default.yaml)
#   ./quickstart.sh test   run the test suite
# Set-up: a virtualenv in .venv, `pip install -e .[dev]`, and Debian's dataset-fashion-mnist package
# (installed with apt when missing and we are root or have sudo; otherwise torchvision's download is tried).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import vaegan, ray, mlflow, torchvision, pytest, xdist, flask_wtf, optuna" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet --upgrade pip
    # The lock pins every runtime dependency, so a fresh machine gets what CI and the container image run.
    "$VENV/bin/pip" install --quiet -c deploy/requirements.lock -e ".[dev]"
  fi
}

ensure_dataset() {
  [ -d /usr/share/datasets/fashion-mnist ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "note: could not install dataset-fashion-mnist with apt; torchvision's download will be tried" >&2
  fi
}

case "${1:-}" in
  job)
    ensure_venv; ensure_dataset
    shift
    exec "$VENV/bin/vaegan" run --config pipelines/configs/default.yaml "$@"
    ;;
  test)
    ensure_venv; ensure_dataset
    shift
    # Two test processes, each module's tests kept together and the longest first (tests/conftest.py says why);
    # the slowest tests are listed so that the suite's time stays visible. A test process that dies (e.g. one
    # that Ray ends when a cluster it joined goes away) fails the run at once, naming the test it was running;
    # otherwise xdist starts a new one, and once, with our scope scheduling, the run then hung with both idle.
    exec "$VENV/bin/python" -m pytest -q -n 2 --no-loadscope-reorder --max-worker-restart=0 --durations=15 "$@"
    ;;
  *)
    echo "usage: $0 job|test [extra arguments]" >&2
    exit 2
    ;;
esac
