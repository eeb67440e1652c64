#!/usr/bin/env bash
# The two commands of haoyuan on a fresh machine:
#   ./run.sh demo    the release-morning demo (schedule, spike, report)
#   ./run.sh test    lint, type-check and the whole test suite (what CI runs)
#   ./run.sh test --fast   the daily lane: without the tests marked slow
#                    (demo, load, kill -9 and fault tests) or cluster
# Both install what they need first: the OS servers (redis-server,
# postgresql) if missing, and a virtual environment from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"

need_os_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server redis-tools)
  # wrk: the load generator of `./run.sh bench http|peers|peking` (not of the tests)
  if [ "${1:-}" = bench ]; then command -v wrk >/dev/null 2>&1 || missing+=(wrk); fi
  # chromium: the ops dashboard's test drives a real browser (Debian's, headless)
  if [ "${1:-}" = test ]; then command -v chromium >/dev/null 2>&1 || missing+=(chromium); fi
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
  fi
  if ((${#missing[@]})); then
    echo "run.sh: installing ${missing[*]} from the OS packages" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

need_venv() {
  local stamp
  stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.haoyuan-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "run.sh: preparing .venv from pyproject.toml" >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # (pip's warnings about the machine's local indexes are noise here)
    .venv/bin/python -m pip install -q -e '.[dev,load]' 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import engine, api, litestar, locust" >/dev/null
    echo "$stamp" > .venv/.haoyuan-stamp
  fi
}

cmd="${1:-demo}"
shift || true
need_os_packages "$cmd"
need_venv
case "$cmd" in
  demo)
    exec .venv/bin/haoyuan demo "$@"
    ;;
  test)
    .venv/bin/ruff check engine api tests loadtest benchmarks examples
    .venv/bin/mypy
    lane=()
    if [ "${1:-}" = --fast ]; then
      shift
      # Two processes, each with its own private servers, one test file each
      # at a time (module-scoped apps): the lane's wall time halves.
      lane=(-m "not slow and not cluster" -n 2 --dist loadfile)
    fi
    set +e
    .venv/bin/python -m pytest "${lane[@]}" "$@"
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then
      echo "run.sh: pytest collected no tests: that is a failure" >&2
      exit 1
    fi
    exit "$rc"
    ;;
  *)
    exec .venv/bin/haoyuan "$cmd" "$@"
    ;;
esac
