#!/usr/bin/env bash
# selftest.sh [SECONDS]
# Builds floor, starts two instances on port 0, checks their answers, runs ratio.sh between
# them unpinned and pinned to one CPU (expect ratios near 1.0: the spread is the noise band
# of this tooling), and load.sh at 32 connections on one of them; stops both by PID.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib/common.sh"
secs=${1:-5}
export TOKEN=${TOKEN:-perf-token}
# The floor's own build directory, as in mandate/run.sh (not Mandate's CARGO_TARGET_DIR).
export CARGO_TARGET_DIR=${PERF_TARGET:-/tmp/perf-target}

cargo build --release --quiet --manifest-path "$here/floor/Cargo.toml"
bin=$CARGO_TARGET_DIR/release/floor

tmp=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin" 0 >"$tmp/a.out" 2>&1 & pids+=($!)
"$bin" 0 >"$tmp/b.out" 2>&1 & pids+=($!)
pa=$(wait_listening "$tmp/a.out" "${pids[0]}")
pb=$(wait_listening "$tmp/b.out" "${pids[1]}")
echo "floor A: pid ${pids[0]} port $pa; floor B: pid ${pids[1]} port $pb"

# Functional check: 200 + JSON decision with a token, 401 without, 404 elsewhere.
code() { curl -s -o "$tmp/body" -w '%{http_code}' "$@"; }
c=$(code -X POST -H 'Content-Type: application/json' -H "Authorization: Bearer $TOKEN" -d '{"action":"x"}' "http://127.0.0.1:$pa/v1/check")
[ "$c" = 200 ] && grep -q '"decision":"allow"' "$tmp/body" || { echo "FAIL: /v1/check with token gave $c" >&2; exit 1; }
c=$(code -X POST -d '{"action":"x"}' "http://127.0.0.1:$pa/v1/check")
[ "$c" = 401 ] || { echo "FAIL: /v1/check without token gave $c" >&2; exit 1; }
c=$(code "http://127.0.0.1:$pa/other")
[ "$c" = 404 ] || { echo "FAIL: /other gave $c" >&2; exit 1; }
echo "floor answers: ok (200 with token, 401 without, 404 elsewhere)"

echo "load on floor A, 32 connections, ${secs}s:"
"$here/load.sh" "http://127.0.0.1:$pa/v1/check" 32 "$secs"
echo "ratio floor A (as candidate) vs floor B, ${secs}s runs, unpinned:"
"$here/ratio.sh" "http://127.0.0.1:$pa/v1/check" "http://127.0.0.1:$pb/v1/check" "$secs"
echo "ratio floor A (as candidate) vs floor B, ${secs}s runs, pinned to one CPU:"
CAND_PID=${pids[0]} FLOOR_PID=${pids[1]} \
  "$here/ratio.sh" "http://127.0.0.1:$pa/v1/check" "http://127.0.0.1:$pb/v1/check" "$secs"
