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
# The MCP upstream (/mcp): initialize opens a session, a notification is a 202, a tools/call
# echoes its id with the fixed result.
mcp=(-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream')
c=$(code -D "$tmp/headers" "${mcp[@]}" "http://127.0.0.1:$pa/mcp" \
      -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"selftest","version":"0"}}}')
sid=$(sed -n 's/^[Mm]cp-[Ss]ession-[Ii]d: *\([^[:space:]]*\).*/\1/p' "$tmp/headers")
[ "$c" = 200 ] && [ -n "$sid" ] && grep -q '"protocolVersion":"2025-11-25"' "$tmp/body" \
  || { echo "FAIL: /mcp initialize gave $c (session '$sid'): $(cat "$tmp/body")" >&2; exit 1; }
c=$(code "${mcp[@]}" -H "Mcp-Session-Id: $sid" "http://127.0.0.1:$pa/mcp" -d '{"jsonrpc":"2.0","method":"notifications/initialized"}')
[ "$c" = 202 ] || { echo "FAIL: /mcp notification gave $c" >&2; exit 1; }
c=$(code "${mcp[@]}" -H "Mcp-Session-Id: $sid" "http://127.0.0.1:$pa/mcp" \
      -d '{"jsonrpc":"2.0","id":"c-9","method":"tools/call","params":{"name":"transfer","arguments":{"account":"acct-1","amount":50}}}')
[ "$c" = 200 ] && grep -q '"id":"c-9","result":{"content":\[{"type":"text","text":"ok"}\],"isError":false}' "$tmp/body" \
  || { echo "FAIL: /mcp tools/call gave $c: $(cat "$tmp/body")" >&2; exit 1; }
echo "floor answers: ok (200 with token, 401 without, 404 elsewhere; /mcp initialize, notification, tools/call)"

echo "load on floor A, 32 connections, ${secs}s:"
"$here/load.sh" "http://127.0.0.1:$pa/v1/check" 32 "$secs"
echo "ratio floor A (as candidate) vs floor B, ${secs}s runs, unpinned:"
"$here/ratio.sh" "http://127.0.0.1:$pa/v1/check" "http://127.0.0.1:$pb/v1/check" "$secs"
echo "ratio floor A (as candidate) vs floor B, ${secs}s runs, pinned to one CPU:"
CAND_PID=${pids[0]} FLOOR_PID=${pids[1]} \
  "$here/ratio.sh" "http://127.0.0.1:$pa/v1/check" "http://127.0.0.1:$pb/v1/check" "$secs"
