#!/usr/bin/env bash
# benches/pinned/mcp/run.sh MANDATE_BIN [SECONDS]
# The MCP gateway (issue 13 item 9): `tools/call` through Mandate's /mcp/tools against the same
# call sent directly to the same upstream, and native /v1/check against its floor, in one run.
# Starts the bare MCP upstream (the floor's /mcp), the HTTP floor (/v1/check) and `mandate
# serve` with the example config plus `[[mcp.servers]] name = "tools"` pointing at the
# upstream (a fresh store and audit log, free loopback ports); opens one MCP session through
# Mandate and one directly (initialize, notifications/initialized) and checks that the
# measured call, `transfer` of 50 from acct-1, is allowed (isError false) both ways; then:
#   single connection, pinned (Mandate, the upstream, the floor and wrk on PIN_CPU), ROUNDS
#   interleaved rounds of (a) direct, (b) through Mandate, (c) native /v1/check (the same
#   check repeated), (c2) native with a new check every time (DISTINCT=1, as every tools/call
#   is decided anew), (d) the floor's /v1/check; best p50 and p99 of each;
#   32 connections, unpinned (wrk -t2 -c32): p50/p99/rps of each;
#   Mandate's RSS after, and the audit log's count of MCP decisions (all must be allow);
#   the summary: MCP overhead = p50(b) - p50(a), native cost above the floor = p50(c) - p50(d),
#   their ratio (target < 2) and p50(b) / p50(a); the same ratio against (c2) - (d) for context.
# Every answer is checked (lib/check.lua's EXPECT): a 200 whose body carries `"isError":false`
# (MCP) or `"decision":"allow"` (/v1/check); anything else fails the run. All wrk connections
# of one case send the same prepared request in the same session (one Mcp-Session-Id, the
# same JSON-RPC id): neither Mandate nor the upstream tracks ids, and a tools/call is decided
# every time (no decision cache answers it; the repeated native /v1/check is answered from
# its one-second decision cache, see README "Benchmarks").
# Env: CONFIG (default: config/mandate.toml of this checkout; the other files of its
#      directory are linked beside the bench's copy, so its relative paths resolve),
#      BUNDLE (policy bundle dir, default: the config's own), PERF_TARGET (floor build, default
#      /tmp/perf-target), ROUNDS (default 3), PIN_CPU (default 0), WARMUP_S (default 1).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source-path=SCRIPTDIR/.. source=lib/common.sh
. "$here/lib/common.sh"
bin=$(readlink -f "${1:?usage: run.sh MANDATE_BIN [SECONDS]}")
secs=${2:-5}
repo=$(cd "$here/../.." && pwd)
config=$(readlink -f "${CONFIG:-$repo/config/mandate.toml}")
perf=${PERF_TARGET:-/tmp/perf-target}
rounds=${ROUNDS:-3}
[ "$rounds" -ge 2 ] || rounds=2
export PIN_CPU=${PIN_CPU:-0}
command -v taskset >/dev/null || { echo "needs taskset (util-linux)" >&2; exit 2; }
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }

# The floor is both the MCP upstream (/mcp) and the /v1/check floor; a no-op when up to date.
CARGO_TARGET_DIR=$perf cargo build --release --quiet --manifest-path "$here/floor/Cargo.toml"
floor_bin=$perf/release/floor

perf_workspace mcp
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "uptime: $(uptime)"
"$floor_bin" 0 >"$work/upstream.log" 2>&1 &
upid=$!; pids+=("$upid")
"$floor_bin" 0 >"$work/floor.log" 2>&1 &
fpid=$!; pids+=("$fpid")
uport=$(wait_listening "$work/upstream.log" "$upid")
fport=$(wait_listening "$work/floor.log" "$fpid")

# The config: a copy of CONFIG with the upstream appended (the environment cannot add an
# array entry), in a directory whose other entries link to CONFIG's, so that its relative
# paths (the bundle, the dev keys) resolve as they do for CONFIG itself.
mkdir "$work/config"
for e in "$(dirname "$config")"/*; do ln -s "$e" "$work/config/"; done
mcfg=$work/config/mcp-bench.toml
{ cat "$config"; printf '\n[[mcp.servers]]\nname = "tools"\nurl = "http://127.0.0.1:%s/mcp"\n' "$uport"; } >"$mcfg"

port=$(free_port)
start_mandate "$bin" "$mcfg" "$port" 127.0.0.1:0
TOKEN=$("$bin" dev token --config "$mcfg" --sub agent-1 --claim owner=bob --ttl 1h)
export TOKEN
echo "mandate pid $mpid :$port; mcp upstream pid $upid :$uport; http floor pid $fpid :$fport"

u=http://127.0.0.1:$port f=http://127.0.0.1:$fport
via=$u/mcp/tools direct=http://127.0.0.1:$uport/mcp
proto=2025-11-25
call='{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"account":"acct-1","amount":50}}}'
native_body='{"action":"payments:transfer","resource":{"type":"Account","id":"acct-1"},"context":{"amount":50}}'

# mcp_post URL OUT DATA [CURL_ARGS...] -> the HTTP status; the answer in OUT, its headers in OUT.h
mcp_post() {
  local url=$1 out=$2 data=$3; shift 3
  curl -s -o "$out" -D "$out.h" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
    -H 'Accept: application/json, text/event-stream' -H 'Content-Type: application/json' \
    "$@" "$url" -d "$data"
}
# open_session URL -> the Mcp-Session-Id of a new session (initialize + initialized), after
# one tools/call that must be allowed (through Mandate it also lists the tools: annotations).
open_session() {
  local url=$1 code sid
  code=$(mcp_post "$url" "$work/a" "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"$proto\",\"capabilities\":{},\"clientInfo\":{\"name\":\"mcp-bench\",\"version\":\"0\"}}}")
  sid=$(tr -d '\r' <"$work/a.h" | sed -n 's/^[Mm][Cc][Pp]-[Ss][Ee][Ss][Ss][Ii][Oo][Nn]-[Ii][Dd]: *//p' | head -n1)
  [ "$code" = 200 ] && [ -n "$sid" ] && jq -e --arg p "$proto" '.result.protocolVersion == $p' "$work/a" >/dev/null \
    || fail "initialize at $url: $code session '$sid': $(cat "$work/a")"
  code=$(mcp_post "$url" "$work/a" '{"jsonrpc":"2.0","method":"notifications/initialized"}' \
           -H "Mcp-Session-Id: $sid" -H "MCP-Protocol-Version: $proto")
  [ "$code" = 202 ] || fail "notifications/initialized at $url: $code $(cat "$work/a")"
  code=$(mcp_post "$url" "$work/a" "$call" -H "Mcp-Session-Id: $sid" -H "MCP-Protocol-Version: $proto")
  # Allowed and answered by the upstream: a refusal through Mandate is `isError: true` (deny,
  # escalate) or a JSON-RPC error (no annotations, bad params); either means a wrong setup.
  [ "$code" = 200 ] && jq -e '.id == 1 and (has("error") | not) and .result.isError == false
      and .result.content[0].text == "ok"' "$work/a" >/dev/null \
    || fail "tools/call transfer 50 at $url: $code $(cat "$work/a")"
  echo "$sid"
}
sid_via=$(open_session "$via")
sid_direct=$(open_session "$direct")
code=$(curl -s -o "$work/a" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
         "$u/v1/check" -d "$native_body")
[ "$code" = 200 ] && grep -q '"decision":"allow"' "$work/a" || fail "native /v1/check: $code $(cat "$work/a")"
echo "allowed: tools/call transfer {account: acct-1, amount: 50} through Mandate (session $sid_via)" \
  "and directly (session $sid_direct); native /v1/check payments:transfer 50"
echo "rss_kib_idle=$(awk '/VmRSS/{print $2}' "/proc/$mpid/status")"

# The four cases as env for lib/check.lua: the same TOKEN everywhere (the upstream and the
# floor ignore it), the MCP headers on the MCP cases, every answer checked.
mcp_headers="MCP-Protocol-Version: $proto|Accept: application/json, text/event-stream"
declare -A url body hdrs expect distinct
url[direct]=$direct body[direct]=$call hdrs[direct]="Mcp-Session-Id: $sid_direct|$mcp_headers"
url[mcp]=$via body[mcp]=$call hdrs[mcp]="Mcp-Session-Id: $sid_via|$mcp_headers"
url[native]=$u/v1/check body[native]=$native_body hdrs[native]=''
url[floor]=$f/v1/check body[floor]=$native_body hdrs[floor]=''
# Context for the summary: native /v1/check with a new check every time (DISTINCT=1: the
# resource id varies, so no decision cache answers), as every tools/call is decided.
url[native_new]=$u/v1/check body[native_new]=$native_body hdrs[native_new]=''
expect[direct]='"isError":false' expect[mcp]='"isError":false' expect[native]='"decision":"allow"'
expect[native_new]='"decision":"allow"' expect[floor]='"decision":"allow"'
distinct[native_new]=1
cases=(direct mcp native native_new floor)
# with_env CASE CMD...: CMD with the case's request and expected answer (lib/check.lua).
with_env() {
  local c=$1; shift
  BODY=${body[$c]} HEADERS=${hdrs[$c]} EXPECT=${expect[$c]} DISTINCT=${distinct[$c]:-} "$@"
}

best() { if [ -z "$1" ]; then echo "$2"; else awk -v a="$1" -v b="$2" 'BEGIN { print (b < a ? b : a) }'; fi; }
declare -A c1p50 c1p99 c32 requests
for c in "${cases[@]}"; do c1p50[$c]='' c1p99[$c]='' requests[$c]=0; done

echo "== c1 pinned on cpu $PIN_CPU (mandate, upstream, floor, wrk), $rounds interleaved rounds of ${secs}s:" \
  "(a) direct (b) through mandate (c) native /v1/check (c2) native, new checks (d) floor /v1/check"
warn_if_busy
pin_pids "$PIN_CPU" "$mpid" "$upid" "$fpid"
for r in $(seq 1 "$rounds"); do
  for c in "${cases[@]}"; do
    out=$(with_env "$c" "$here/rtt.sh" "${url[$c]}" "$secs")
    printf '  round %s %-7s %s\n' "$r" "$c:" "$out"
    c1p50[$c]=$(best "${c1p50[$c]}" "$(kv rtt_us_p50 "$out")")
    c1p99[$c]=$(best "${c1p99[$c]}" "$(kv rtt_us_p99 "$out")")
    requests[$c]=$((${requests[$c]} + $(kv requests "$out")))
  done
done
unpin_pids
for c in "${cases[@]}"; do echo "c1 $c best p50=${c1p50[$c]} us best p99=${c1p99[$c]} us"; done

echo "== 32 connections, unpinned (wrk -t2 -c32, ${secs}s; the MCP cases: all 32 connections in one session)"
for c in "${cases[@]}"; do
  c32[$c]=$(with_env "$c" "$here/load.sh" "${url[$c]}" 32 "$secs" | tail -1)
  echo "  $c: ${c32[$c]}"
  requests[$c]=$((${requests[$c]} + $(kv requests "${c32[$c]}")))
done
echo "rss_kib_after=$(awk '/VmRSS/{print $2}' "/proc/$mpid/status")"

# The audit log: every MCP decision was an allow of the transfer, at least one per counted
# request (warm-ups are decided too, and not counted).
sleep 0.1
mcp_allow=$(audit_records | grep -c '"action":"mcp:tools/transfer"' || true)
mcp_other=$(audit_records | grep '"action":"mcp:' | grep -vc '"decision":"allow"' || true)
echo "audit_lines=$(audit_records | wc -l) mcp_transfer_decisions=$mcp_allow mcp_not_allow=$mcp_other counted_mcp_requests=${requests[mcp]}"
[ "$mcp_other" = 0 ] || fail "$mcp_other MCP decisions were not allow"
[ "$mcp_allow" -ge "${requests[mcp]}" ] || fail "fewer MCP decisions ($mcp_allow) than requests answered (${requests[mcp]})"

echo "== summary (target: MCP overhead < 2x the native check's cost above the floor)"
awk -v a="${c1p50[direct]}" -v b="${c1p50[mcp]}" -v c="${c1p50[native]}" -v d="${c1p50[floor]}" \
    -v cn="${c1p50[native_new]}" 'BEGIN {
  o = b - a; n = c - d; nn = cn - d
  printf "c1 p50: (a) direct %s us, (b) through mandate %s us, (c) native /v1/check %s us, (c2) native new checks %s us, (d) floor %s us\n", a, b, c, cn, d
  printf "MCP overhead = p50(b) - p50(a) = %s us; native check cost above floor = p50(c) - p50(d) = %s us\n", o, n
  if (n > 0) printf "overhead / native cost = %.2f (%s); p50(b) / p50(a) = %.2f\n", o / n, (o / n < 2 ? "PASS" : "MISS"), b / a
  else printf "overhead / native cost: undefined (native cost above floor %s us); p50(b) / p50(a) = %.2f\n", n, b / a
  if (nn > 0) printf "(context: a new native check costs %s us above the floor; overhead / that = %.2f)\n", nn, o / nn
}'
for c in "${cases[@]}"; do
  echo "c32 $c p50=$(kv latency_us_p50 "${c32[$c]}") us p99=$(kv latency_us_p99 "${c32[$c]}") us rps=$(kv rps "${c32[$c]}")"
done
