#!/usr/bin/env bash
# Background jobs on the GPU machine that outlive one `device run` call (the tool kills a call's processes
# when it returns, except those in a new session: setsid). Lets the phases that do not time anything
# overlap (vLLM's pip install, the exports' GPTQ, lm-eval, staging calls) and a long phase run past the
# 10-minute limit of a call; the calls after it only look. Logs and exit codes in /tmp/results/bg-NAME.*.
#   bash bench/device/bg.sh start NAME COMMAND...   # COMMAND run by bash -c, in the repository root
#   bash bench/device/bg.sh wait NAME [SECONDS]     # until NAME ends or SECONDS pass (default 540)
#   bash bench/device/bg.sh stop NAME               # kill NAME's process group
#   bash bench/device/bg.sh status                  # each job: running or its exit code, and its log's tail
#   bash bench/device/bg.sh collect                 # /tmp/results as $OUT/results.tar.gz
# Nothing timed may overlap another job: `wait` for (or `stop`) the others before a timing phase starts.
set -uo pipefail
R=${BG_RESULTS:-/tmp/results}; mkdir -p $R
running() { [ -f $R/bg-$1.pid ] && [ ! -f $R/bg-$1.rc ] && kill -0 "$(cat $R/bg-$1.pid)" 2>/dev/null; }
show() {
  local name=$1 state
  if running $name; then state="running since $(stat -c %y $R/bg-$name.pid | cut -c12-19)"
  elif [ -f $R/bg-$name.rc ]; then state="ended, exit $(cat $R/bg-$name.rc)"
  else state="ended without an exit code (killed)"; fi
  echo "== $name: $state"; tail -n ${TAIL:-6} $R/bg-$name.log 2>/dev/null | cut -c1-300
}
case ${1:-} in
  start)
    name=$2; shift 2
    running $name && { echo "bg: $name is already running" >&2; exit 2; }
    rm -f $R/bg-$name.rc
    # setsid: its own session and process group, so the call's end does not kill it; `stop` kills the group.
    setsid bash -c "( $* ); echo \$? > $R/bg-$name.rc" > $R/bg-$name.log 2>&1 < /dev/null &
    echo $! > $R/bg-$name.pid; echo "bg: $name started (pid $!)";;
  wait)
    name=$2; end=$((SECONDS + ${3:-540}))
    while running $name && [ $SECONDS -lt $end ]; do sleep 5; done
    show $name;;
  stop)
    name=$2
    if running $name; then kill -- -"$(cat $R/bg-$name.pid)" 2>/dev/null; sleep 3; echo "bg: $name stopped"; fi
    show $name;;
  status) for f in $R/bg-*.pid; do [ -f "$f" ] && show "$(basename "$f" .pid | cut -c4-)"; done;;
  collect) tar czf "$OUT/results.tar.gz" -C $R . && echo "bg: $R -> \$OUT/results.tar.gz ($(du -h "$OUT/results.tar.gz" | cut -f1))";;
  *) sed -n 2,11p "$0" >&2; exit 2;;
esac
