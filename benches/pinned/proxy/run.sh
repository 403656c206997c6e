#!/usr/bin/env bash
# benches/pinned/proxy/run.sh MANDATE_BIN [SECONDS]
# Mandate's proxy modes against bare floors, all in one run (issue 12 item 6):
#   native POST /v1/check, HTTP forward auth (Envoy HTTP mode /authz/envoy/<path> with the
#   transfer's JSON body, nginx /authz/nginx for a route that reads no body) and gRPC Envoy
#   ext_authz (envoy.service.auth.v3.Authorization/Check).
# Starts `mandate serve` (example config, its bundle unless BUNDLE is set, a fresh store and
# audit log, HTTP and gRPC listeners on free loopback ports), the HTTP floor and the gRPC
# floor; checks each path answers allow; then prints, for each mode, the pinned single-
# connection p50/p99 against its floor (interleaved rounds, best of each), p50/p99/rps at 32
# connections (HTTP) or 32 streams on one HTTP/2 connection (gRPC) for Mandate and the floor,
# the single-stream p50 of each proxy mode divided by native /v1/check's (target <= 2), whether
# p99 at 32 is under 1 ms, and Mandate's RSS after.
# Then the open loop at 32: the closed loop above runs each server at capacity, where latency
# is queueing (32 / rps on average) and any p99 target is a throughput target in disguise. So
# each mode is driven once more by 32 connections (HTTP: http-load) or 32 streams (gRPC:
# grpc-load --rate) that send at a fixed rate, OPEN_SHARE (default 0.5) of what Mandate
# sustained in that mode's closed loop, whether or not answers are back, as 32 agents each
# calling on their own schedule do; the floor gets the same rate. Its p99 is the latency an
# agent sees on a busy sidecar; `late=` counts calls that had to wait for their stream.
# Env: CONFIG (default: config/mandate.toml of this checkout), BUNDLE (policy bundle dir,
#      default: the config's own), PERF_TARGET (floor builds, default /tmp/perf-target),
#      ROUNDS (pinned rounds per mode, default 3), PIN_CPU (default 0), WARMUP_S (default 1),
#      OPEN_SHARE (default 0.5).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$here/lib/common.sh"
bin=$(readlink -f "${1:?usage: run.sh MANDATE_BIN [SECONDS]}")
secs=${2:-5}
repo=$(cd "$here/../.." && pwd)
config=${CONFIG:-$repo/config/mandate.toml}
perf=${PERF_TARGET:-/tmp/perf-target}
rounds=${ROUNDS:-3}
[ "$rounds" -ge 2 ] || rounds=2
export PIN_CPU=${PIN_CPU:-0}
warmup=${WARMUP_S:-1}
command -v taskset >/dev/null || { echo "needs taskset (util-linux)" >&2; exit 2; }

# Both floors: cargo does nothing when they are up to date.
for m in floor grpc; do
  CARGO_TARGET_DIR=$perf cargo build --release --quiet --manifest-path "$here/$m/Cargo.toml"
done
floor_bin=$perf/release/floor
gfloor_bin=$perf/release/grpc-floor
gload=$perf/release/grpc-load
hload=$perf/release/http-load
share=${OPEN_SHARE:-0.5}

perf_workspace proxy

port=$(free_port)
gport=$(free_port)
start_mandate "$bin" "$config" "$port" "127.0.0.1:$gport"
"$floor_bin" 0 >"$work/floor.log" 2>&1 &
fpid=$!; pids+=("$fpid")
"$gfloor_bin" 0 >"$work/gfloor.log" 2>&1 &
gfpid=$!; pids+=("$gfpid")
fport=$(wait_listening "$work/floor.log" "$fpid")
gfport=$(wait_listening "$work/gfloor.log" "$gfpid")
TOKEN=$("$bin" dev token --config "$config" --sub agent-1 --claim owner=bob)
export TOKEN
echo "mandate pid $mpid http :$port grpc :$gport; http floor pid $fpid :$fport; grpc floor pid $gfpid :$gfport"

# The three HTTP requests, as wrk (lib/check.lua) sends them: env for lib/check.lua.
native=(BODY='{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}}')
envoy_path=/authz/envoy/accounts/acct-1/transfers
envoy=(BODY='{"amount":50}')
nginx=(METHOD=GET NO_BODY=1
       HEADERS='X-Original-Method: GET|X-Original-URI: /crm/records/c-1|X-Original-Host: api.example.com')

# Check each path answers allow before measuring anything.
fail() { echo "FAIL: $*" >&2; exit 1; }
expect_allow() { # expect_allow WHAT CURL_ARGS...: a 200 with an allow decision
  local what=$1 code; shift
  code=$(curl -s -o "$work/a" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$@")
  if [ "$code" != 200 ] || ! grep -q '"decision":"allow"' "$work/a"; then fail "$what: $code $(cat "$work/a")"; fi
}
expect_allow "native /v1/check" "127.0.0.1:$port/v1/check" -H 'content-type: application/json' -d "${native[0]#BODY=}"
expect_allow "envoy HTTP $envoy_path" "127.0.0.1:$port$envoy_path" -H 'content-type: application/json' -d "${envoy[0]#BODY=}"
expect_allow "nginx /authz/nginx" "127.0.0.1:$port/authz/nginx" \
  -H 'X-Original-Method: GET' -H 'X-Original-URI: /crm/records/c-1' -H 'X-Original-Host: api.example.com'
echo "allow: native /v1/check, envoy HTTP $envoy_path, nginx /authz/nginx (GET /crm/records/c-1)"
a=$("$gload" --addr "127.0.0.1:$gport" --once) || fail "grpc Check on mandate: $a"
echo "allow: grpc mandate $a"
a=$("$gload" --addr "127.0.0.1:$gfport" --once) || fail "grpc Check on the floor: $a"
echo "allow: grpc floor   $a"
echo "rss_kib_idle=$(awk '/VmRSS/{print $2}' "/proc/$mpid/status")"

u=http://127.0.0.1:$port f=http://127.0.0.1:$fport
best() { if [ -z "$1" ]; then echo "$2"; else awk -v a="$1" -v b="$2" 'BEGIN { print (b < a ? b : a) }'; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# pinned_http NAME PATH ENV...: ratio.sh, pinned, Mandate against the HTTP floor; sets
# c1p50[NAME] and c1p99[NAME] to Mandate's best p50 and p99.
declare -A c1p50 c1p99
pinned_http() {
  local name=$1 path=$2 out; shift 2
  echo "== $name: c1 pinned on cpu $PIN_CPU, $rounds interleaved rounds of ${secs}s"
  out=$(env "$@" CAND_PID="$mpid" FLOOR_PID="$fpid" ROUNDS="$rounds" "$here/ratio.sh" "$u$path" "$f$path" "$secs")
  printf '%s\n' "$out" | grep -E '^round' | sed 's/^/  /'
  printf '%s\n' "$out" | tail -2
  c1p99[$name]=$(printf '%s\n' "$out" | sed -n 's/^p99 ratio .*candidate best p99 \([0-9.]*\) us.*/\1/p')
  c1p50[$name]=$(printf '%s\n' "$out" | sed -n 's/^rtt ratio .*candidate p50 \([0-9.]*\) us.*/\1/p')
}

# grpc_measure ADDR STREAMS [pin|-] [GRPC_LOAD_ARGS...]: one grpc-load run (`pin`: on
# PIN_CPU), with steal_pct as wrk_measure adds it.
grpc_measure() {
  local addr=$1 streams=$2 pin=() s0 s1 out
  if [ "${3:-}" = pin ]; then pin=(taskset -c "$PIN_CPU"); fi
  shift $(($# < 3 ? $# : 3))
  s0=$(cpu_snapshot)
  out=$("${pin[@]}" timeout $((secs + warmup + 30)) "$gload" --addr "$addr" --streams "$streams" \
          --seconds "$secs" --warmup "$warmup" "$@")
  s1=$(cpu_snapshot)
  printf '%s steal_pct=%s\n' "$out" "$(awk -v a="$s0" -v b="$s1" 'BEGIN { split(a, x, " "); split(b, y, " ");
      printf "%.1f", (y[2] > x[2]) ? 100 * (y[1] - x[1]) / (y[2] - x[2]) : 0 }')"
}

pinned_http native /v1/check "${native[@]}"
pinned_http envoy "$envoy_path" "${envoy[@]}"
pinned_http nginx /authz/nginx "${nginx[@]}"

echo "== grpc: c1 pinned on cpu $PIN_CPU (mandate, grpc floor, grpc-load), $rounds interleaved rounds of ${secs}s"
warn_if_busy
pin_pids "$PIN_CPU" "$mpid" "$gfpid"
bc50='' bf50='' bc99='' bf99=''
for r in $(seq 1 "$rounds"); do
  c=$(grpc_measure "127.0.0.1:$gport" 1 pin); echo "  round $r candidate: $c"
  g=$(grpc_measure "127.0.0.1:$gfport" 1 pin); echo "  round $r floor:     $g"
  bc50=$(best "$bc50" "$(kv latency_us_p50 "$c")"); bc99=$(best "$bc99" "$(kv latency_us_p99 "$c")")
  bf50=$(best "$bf50" "$(kv latency_us_p50 "$g")"); bf99=$(best "$bf99" "$(kv latency_us_p99 "$g")")
done
unpin_pids
echo "p99 ratio $(ratio "$bc99" "$bf99") (candidate best p99 $bc99 us / floor best p99 $bf99 us)"
echo "rtt ratio $(ratio "$bc50" "$bf50") (candidate p50 $bc50 us / floor p50 $bf50 us)"
c1p50[grpc]=$bc50 c1p99[grpc]=$bc99

echo "== 32 connections (HTTP, wrk -t2) / 32 streams on one HTTP/2 connection (gRPC), unpinned, ${secs}s"
declare -A c32
load32() { # load32 NAME URL ENV...
  local name=$1 url=$2 out; shift 2
  out=$(env "$@" "$here/load.sh" "$url" 32 "$secs" | tail -1)
  c32[$name]=$out; echo "  $name: $out"
}
load32 native "$u/v1/check" "${native[@]}"
load32 native_floor "$f/v1/check" "${native[@]}"
load32 envoy "$u$envoy_path" "${envoy[@]}"
load32 envoy_floor "$f$envoy_path" "${envoy[@]}"
load32 nginx "$u/authz/nginx" "${nginx[@]}"
load32 nginx_floor "$f/authz/nginx" "${nginx[@]}"
warn_if_busy
c32[grpc]=$(grpc_measure "127.0.0.1:$gport" 32); echo "  grpc: ${c32[grpc]}"
c32[grpc_floor]=$(grpc_measure "127.0.0.1:$gfport" 32); echo "  grpc_floor: ${c32[grpc_floor]}"

echo "== open loop at 32, unpinned, ${secs}s: each mode at $share x Mandate's closed-loop rps in it, the floor at the same rate"
declare -A open32
open_http() { # open_http NAME URL RATE ENV...
  local name=$1 url=$2 rate=$3 out; shift 3
  out=$(env "$@" timeout $((secs + warmup + 30)) "$hload" "$url" 32 "$rate" "$secs" "$warmup")
  open32[$name]=$out; echo "  $name: $out"
}
rate_of() { awk -v r="$(kv rps "${c32[$1]}")" -v s="$share" 'BEGIN { printf "%d", r * s }'; }
for m in native envoy nginx; do
  case $m in native) path=/v1/check; env_=("${native[@]}");; envoy) path=$envoy_path; env_=("${envoy[@]}");;
              nginx) path=/authz/nginx; env_=("${nginx[@]}");; esac
  rate=$(rate_of "$m")
  warn_if_busy
  open_http "$m" "$u$path" "$rate" "${env_[@]}"
  open_http "${m}_floor" "$f$path" "$rate" "${env_[@]}"
done
rate=$(rate_of grpc)
warn_if_busy
open32[grpc]=$(grpc_measure "127.0.0.1:$gport" 32 - --rate "$rate"); echo "  grpc: ${open32[grpc]}"
open32[grpc_floor]=$(grpc_measure "127.0.0.1:$gfport" 32 - --rate "$rate"); echo "  grpc_floor: ${open32[grpc_floor]}"

echo "rss_kib_after=$(awk '/VmRSS/{print $2}' "/proc/$mpid/status")"
echo "audit_lines=$(audit_records | wc -l)"

echo "== summary (targets: single-stream p50 <= 2x native /v1/check; p99 at 32 < 1000 us)"
echo "native /v1/check c1 p50=${c1p50[native]} us p99=${c1p99[native]} us"
for m in grpc envoy nginx; do
  r=$(ratio "${c1p50[$m]}" "${c1p50[native]}")
  ok=$(awk -v r="$r" 'BEGIN { print (r <= 2 ? "PASS" : "MISS") }')
  echo "$m c1 p50=${c1p50[$m]} us p99=${c1p99[$m]} us: p50 / native p50 = $r ($ok)"
done
for m in native envoy nginx grpc; do
  p99=$(kv latency_us_p99 "${c32[$m]}")
  ok=$(awk -v p="$p99" 'BEGIN { print (p < 1000 ? "PASS" : "MISS") }')
  fl=${c32[${m}_floor]}
  echo "$m c32 p50=$(kv latency_us_p50 "${c32[$m]}") us p99=$p99 us rps=$(kv rps "${c32[$m]}"): p99 < 1 ms $ok" \
    "(floor p50=$(kv latency_us_p50 "$fl") p99=$(kv latency_us_p99 "$fl") rps=$(kv rps "$fl"))"
done
for m in native envoy nginx grpc; do
  o=${open32[$m]} fl=${open32[${m}_floor]}
  p99=$(kv latency_us_p99 "$o")
  ok=$(awk -v p="$p99" 'BEGIN { print (p < 1000 ? "PASS" : "MISS") }')
  echo "$m open32 at $(kv rate "$o")/s: p50=$(kv latency_us_p50 "$o") us p99=$p99 us late=$(kv late "$o"): p99 < 1 ms $ok" \
    "(floor at the same rate: p50=$(kv latency_us_p50 "$fl") p99=$(kv latency_us_p99 "$fl") late=$(kv late "$fl"))"
done
