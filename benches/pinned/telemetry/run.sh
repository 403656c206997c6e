#!/usr/bin/env bash
# benches/pinned/telemetry/run.sh MANDATE_BIN [SECONDS]
# What telemetry costs a check (issue 15 item 6): the same binary twice, side by side, both
# pinned with wrk to one CPU and measured interleaved (ratio.sh):
#   off: `telemetry.metrics = false`, no OTLP endpoint (no reader, no span: the instruments
#        record into nothing);
#   on:  `/metrics` on, and OTLP to a collector (tests/peers/otlp_receiver.py, grpcio) with
#        traces sampled at 1% (`trace_sample_ratio = 0.01`) and metrics pushed every second.
# Prints the on/off ratio for the same check repeated and for a new check every time, the
# spans the collector received, and both servers' RSS.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$here/lib/common.sh"
bin=${1:?usage: run.sh MANDATE_BIN [SECONDS]}
secs=${2:-5}
repo=$(cd "$here/../.." && pwd)
config=${CONFIG:-$repo/config/mandate.toml}
perf_workspace telemetry
python3 "$repo/tests/peers/otlp_receiver.py" "$work/otlp.jsonl" >"$work/collector.out" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do grep -q '^listening' "$work/collector.out" && break; sleep 0.1; done
cport=$(awk '/^listening/{print $2}' "$work/collector.out")
[ -n "$cport" ] || { echo "the collector did not start:" >&2; cat "$work/collector.out" >&2; exit 1; }
poff=$(free_port)
MDATA=$work/off start_mandate "$bin" "$config" "$poff" 127.0.0.1:0 MANDATE_TELEMETRY__METRICS=false
off=$mpid
pon=$(free_port)
MDATA=$work/on start_mandate "$bin" "$config" "$pon" 127.0.0.1:0 \
  MANDATE_TELEMETRY__OTLP_ENDPOINT="http://127.0.0.1:$cport" MANDATE_TELEMETRY__TRACE_SAMPLE_RATIO=0.01 \
  MANDATE_TELEMETRY__OTLP_INTERVAL=1s
on=$mpid
export TOKEN=$("$bin" dev token --config "$config" --sub agent-1 --claim owner=bob)
for p in "$poff" "$pon"; do
  ans=$(curl -s "127.0.0.1:$p/v1/check" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d '{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}}')
  echo "$ans" | grep -q '"decision":"allow"' || { echo "not allow: $ans"; exit 1; }
done
curl -sf "127.0.0.1:$poff/metrics" >/dev/null && { echo "metrics are not off"; exit 1; }
uon="http://127.0.0.1:$pon/v1/check"; uoff="http://127.0.0.1:$poff/v1/check"
echo "== repeated, pinned: telemetry on / off"
CAND_PID=$on FLOOR_PID=$off ROUNDS=3 "$here/ratio.sh" "$uon" "$uoff" "$secs" | tail -1
echo "== distinct, pinned: telemetry on / off"
DISTINCT=1 CAND_PID=$on FLOOR_PID=$off ROUNDS=3 "$here/ratio.sh" "$uon" "$uoff" "$secs" | tail -1
sleep 6   # the batch span processor's last delay
echo "spans_exported=$(grep -c '"name": "mandate.check"' "$work/otlp.jsonl" || true)"
echo "decisions_on=$(curl -s "127.0.0.1:$pon/metrics" | awk '/^mandate_decisions_total/{s+=$2} END {print s}')"
echo "rss_kib_off=$(awk '/VmRSS/{print $2}' /proc/$off/status) rss_kib_on=$(awk '/VmRSS/{print $2}' /proc/$on/status)"
