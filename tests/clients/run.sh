#!/usr/bin/env bash
# Runs the three official-client checks against a running chorus and closes with
# "clients: N passed, N failed". Installs what is missing first (npm ci; a .venv for Python).
#
#   CHORUS_HTTP=http://127.0.0.1:8080 CHORUS_WRITE_KEY=... CHORUS_SECRET_KEY=... tests/clients/run.sh [python|node|browser ...]
set -u
cd "$(dirname "$0")"
for v in CHORUS_HTTP CHORUS_WRITE_KEY CHORUS_SECRET_KEY; do
  if [ -z "${!v:-}" ]; then echo "FAIL: $v is not set"; exit 2; fi
done

if [ ! -d node_modules/@segment/analytics-node ] || [ ! -d node_modules/@segment/analytics-next ] || [ ! -d node_modules/playwright-core ]; then
  npm ci --no-audit --no-fund --loglevel=error || { echo "FAIL: npm ci"; exit 2; }
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if python3 -c 'import segment.analytics' 2>/dev/null; then
    PY=python3
  else
    [ -x .venv/bin/python ] || python3 -m venv .venv || { echo "FAIL: python3 -m venv"; exit 2; }
    .venv/bin/python -c 'import segment.analytics' 2>/dev/null ||
      .venv/bin/pip install -q -r requirements.txt || { echo "FAIL: pip install -r requirements.txt"; exit 2; }
    PY=.venv/bin/python
  fi
fi

which=("$@")
[ ${#which[@]} -eq 0 ] && which=(python node browser)
passed=0 failed=0
for name in "${which[@]}"; do
  case "$name" in
    python) cmd=("$PY" python_client.py) ;;
    node) cmd=(node node_client.mjs) ;;
    browser) cmd=(node browser_next.mjs) ;;
    *) echo "FAIL: unknown check $name (python, node, browser)"; exit 2 ;;
  esac
  echo "== $name: ${cmd[*]}"
  if timeout 600 "${cmd[@]}"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
