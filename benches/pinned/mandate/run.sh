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
command -v wrk >/dev/null || { echo "needs wrk (apt-get install -y wrk)"; exit 2; }
work=$(mktemp -d /tmp/perf-mandate.XXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MANDATE_SERVER__LISTEN=127.0.0.1:$port MANDATE_EXT_AUTHZ__GRPC_LISTEN=127.0.0.1:0 MANDATE_POLICY__BUNDLE=$bundle \
MANDATE_STORE__URL=$work/m.db MANDATE_AUDIT__PATH=$work/audit.jsonl MANDATE_LOG__LEVEL=warn \
  "$bin" serve --config "$config" >"$work/serve.log" 2>&1 &
mpid=$!
"$floor_bin" 0 >"$work/floor.log" 2>&1 &
fpid=$!
trap 'kill $mpid $fpid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
fport=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/floor.log")
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
