#!/usr/bin/env bash
# benches/pinned/mandate/run.sh MANDATE_BIN BUNDLE_DIR [SECONDS]
# Starts `mandate serve` on a free loopback port with BUNDLE_DIR, a fresh store and audit log
# (example config otherwise, dev issuer), mints an agent token, checks the answer is allow,
# then measures against a bare hyper floor started beside it:
#   pinned c1 ratio (same check repeated) and pinned c1 ratio with DISTINCT bodies,
#   load at 32 connections (repeated and distinct), RSS after.
# Env: CONFIG (default: config/mandate.toml of the checkout this script is in),
#      PERF_TARGET (floor build dir, default /tmp/perf-target).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$here/lib/common.sh"
bin=${1:?usage: run.sh MANDATE_BIN BUNDLE_DIR [SECONDS]}
bundle=$(readlink -f "${2:?bundle}")
secs=${3:-5}
repo=$(cd "$here/../.." && pwd)
config=${CONFIG:-$repo/config/mandate.toml}
floor_bin=${PERF_TARGET:-/tmp/perf-target}/release/floor
[ -x "$floor_bin" ] || CARGO_TARGET_DIR=${PERF_TARGET:-/tmp/perf-target} cargo build --release --quiet \
  --manifest-path "$here/floor/Cargo.toml"
perf_workspace mandate
port=$(free_port)
BUNDLE=$bundle start_mandate "$bin" "$config" "$port" 127.0.0.1:0
"$floor_bin" 0 >"$work/floor.log" 2>&1 &
fpid=$!; pids+=("$fpid")
fport=$(wait_listening "$work/floor.log" "$fpid")
export TOKEN=$("$bin" dev token --config "$config" --sub agent-1 --claim owner=bob)
ans=$(curl -s "127.0.0.1:$port/v1/check" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}}')
echo "answer: $ans" | cut -c1-120
echo "$ans" | grep -q '"decision":"allow"' || { echo "not allow"; exit 1; }
echo "rss_kib_idle=$(awk '/VmRSS/{print $2}' /proc/$mpid/status)"
u="http://127.0.0.1:$port/v1/check"; f="http://127.0.0.1:$fport/v1/check"
echo "== repeated, pinned"; CAND_PID=$mpid FLOOR_PID=$fpid ROUNDS=3 "$here/ratio.sh" "$u" "$f" "$secs" | tail -2
echo "== distinct, pinned"; DISTINCT=1 CAND_PID=$mpid FLOOR_PID=$fpid ROUNDS=3 "$here/ratio.sh" "$u" "$f" "$secs" | tail -2
echo "== load c32 repeated: mandate"; "$here/load.sh" "$u" 32 "$secs"
echo "== load c32 distinct: mandate"; DISTINCT=1 "$here/load.sh" "$u" 32 "$secs"
echo "== load c32: floor"; "$here/load.sh" "$f" 32 "$secs"
echo "rss_kib_after=$(awk '/VmRSS/{print $2}' /proc/$mpid/status)"
echo "audit_bytes_on_disk=$(du -cb "$work"/audit*.jsonl* | tail -1 | cut -f1) audit_lines=$(audit_records | wc -l)"
