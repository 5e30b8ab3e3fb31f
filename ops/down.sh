#!/usr/bin/env bash
# Stop the private servers that ops/up.sh started, and only those.
#
# ops/up.sh records what it started under .local/started/ (one file per server). Servers that
# were already running when ops/up.sh ran are never recorded, so they are never touched here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STARTED="$ROOT/.local/started"
WAIT_SECONDS=${LEDGERFLOW_DOWN_TIMEOUT:-30}
ME=$(id -un)

die() {
    echo "$*" >&2
    exit 1
}

declare -A REC

# load_record FILE -> fills REC (key=value lines; never sourced as shell code)
load_record() {
    local key value
    REC=()
    while IFS='=' read -r key value; do
        [[ -n $key ]] && REC[$key]=$value
    done <"$1"
}

# is_alive PID: a running process (a zombie nobody reaped yet counts as gone)
is_alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $stat && $stat != Z* ]]
}

stop_postgres() {
    local data=${REC[datadir]:-} where="${REC[host]:-?}:${REC[port]:-?}" run=() pg_ctl rc=0
    local run_as=${REC[run_as]:-$ME}
    if [[ -z $data || ! -f $data/PG_VERSION ]]; then
        echo "postgres: the recorded data directory '$data' is gone; nothing to stop"
        return 0
    fi
    if [[ $run_as != "$ME" ]]; then
        [[ $(id -u) -eq 0 ]] || die "postgres: the private server runs as '$run_as';" \
            "run ops/down.sh as that user or as root"
        run=(runuser -u "$run_as" --)
    fi
    pg_ctl=${REC[bindir]:-}/pg_ctl
    [[ -x $pg_ctl ]] || pg_ctl=$(command -v pg_ctl) || die "postgres: pg_ctl not found"
    "${run[@]}" "$pg_ctl" -D "$data" status >/dev/null 2>&1 || rc=$?
    if ((rc == 0)); then
        "${run[@]}" "$pg_ctl" -D "$data" stop -m fast -w -t "$WAIT_SECONDS" >/dev/null ||
            die "postgres: could not stop the private server at $where (data: $data)"
        echo "postgres: stopped the private server at $where (data: $data)"
    else
        echo "postgres: the private server at $where (data: $data) was not running"
    fi
    if [[ -n ${REC[tmp_socket_dir]:-} ]]; then
        rm -rf -- "${REC[tmp_socket_dir]}"
    fi
}

stop_nats() {
    local pid=${REC[pid]:-} store=${REC[store_dir]:-} where="${REC[host]:-?}:${REC[port]:-?}"
    local args deadline
    if [[ -z $pid ]] || ! is_alive "$pid"; then
        echo "nats: the private server at $where was not running"
        return 0
    fi
    # Guard against a recycled pid: it must be a nats-server using our store directory.
    args=$(ps -o args= -p "$pid" 2>/dev/null || true)
    if [[ $args != *nats-server* || $args != *"$store"* ]]; then
        echo "nats: pid $pid is no longer the private server at $where; leaving it alone"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + WAIT_SECONDS))
    while is_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            echo "nats: pid $pid did not exit after SIGTERM within ${WAIT_SECONDS}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while is_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
            break
        fi
        sleep 0.1
    done
    echo "nats: stopped the private server at $where (pid $pid, store: $store)"
}

found=0
for name in postgres nats; do
    file="$STARTED/$name"
    [[ -f $file ]] || continue
    found=1
    load_record "$file"
    "stop_$name"
    rm -f -- "$file"
done
if ((found == 0)); then
    echo "nothing to stop (servers were already running)"
fi
