#!/usr/bin/env bash
# Start a local cluster with the given `banaserve up` flags, run `banaserve bench serve` against
# it once per line on stdin ("LABEL ARGS..."), stop the cluster. A line "! ARGS..." runs
# `banaserve ARGS...` instead, with {router} and {kvstore} replaced by those addresses.
#   bench/scripts/cluster_bench.sh NAME [up flags...] <<< "ttft --workload prefill-heavy ..."
# Results: bench/results/serve-NAME-LABEL.{json,md}; the cluster's log: bench/results/logs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; shift
bin=.venv/bin/banaserve
mkdir -p bench/results/logs
log=bench/results/logs/cluster-$name.log
fifo=$(mktemp -u); mkfifo "$fifo"
$bin up "$@" > "$fifo" 2> "$log" &
up_pid=$!
router=""
kvstore=""
while read -r line; do
  echo "  $line" >&2
  case $line in
    router\ *) router=${line#router } ;;
    kvstore-0\ *) kvstore=${line#kvstore-0 } ;;
    cluster\ ready*) break ;;
  esac
done < "$fifo"
trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid; rm -f "$fifo"' EXIT
[ -n "$router" ] || { echo "cluster did not start; see $log" >&2; exit 1; }
while read -r label args; do
  [ -z "$label" ] && continue
  if [ "$label" = "!" ]; then
    args=${args//\{router\}/$router}
    # shellcheck disable=SC2086
    $bin ${args//\{kvstore\}/$kvstore} < /dev/null
    continue
  fi
  # shellcheck disable=SC2086
  $bin bench serve --target "grpc://$router" --label "$name-$label" --no-progress $args < /dev/null
done
