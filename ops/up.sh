#!/usr/bin/env bash
# Make sure PostgreSQL and NATS (JetStream) answer at the configured URLs.
#
# For each of LEDGERFLOW_DATABASE_URL and LEDGERFLOW_NATS_URL: if a server already answers at
# that host:port it is used as is. Otherwise, when the host is this machine (127.0.0.1 /
# localhost), a private server is started from the binaries installed here, with its data,
# logs and sockets under the project-local, git-ignored folder .local/, listening on loopback
# only. What was started is recorded under .local/started/ so that ops/down.sh stops only that.
#
# It does not create the ledgerflow database: `ledgerflow db init` does.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL="$ROOT/.local"
STARTED="$LOCAL/started"
DB_URL=${LEDGERFLOW_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/ledgerflow}
NATS_URL=${LEDGERFLOW_NATS_URL:-nats://127.0.0.1:4222}
WAIT_SECONDS=${LEDGERFLOW_UP_TIMEOUT:-30}
ME=$(id -un)

die() {
    echo "$*" >&2
    exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# parse_url URL DEFAULT_PORT -> sets URL_USER, URL_HOST, URL_PORT
parse_url() {
    local url=$1 default_port=$2 rest userinfo=""
    url=${url%%,*} # a NATS server list: the first one decides
    rest=${url#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    if [[ $rest == *@* ]]; then
        userinfo=${rest%@*}
        rest=${rest##*@}
    fi
    URL_USER=${userinfo%%:*}
    if [[ $rest == \[*\]* ]]; then # [::1]:5432
        URL_HOST=${rest%%]*}
        URL_HOST=${URL_HOST#[}
        URL_PORT=${rest#*]}
        URL_PORT=${URL_PORT#:}
    elif [[ $rest == *:* ]]; then
        URL_HOST=${rest%:*}
        URL_PORT=${rest##*:}
    else
        URL_HOST=$rest
        URL_PORT=""
    fi
    URL_HOST=${URL_HOST:-127.0.0.1}
    URL_PORT=${URL_PORT:-$default_port}
    if ! [[ $URL_PORT =~ ^[0-9]+$ ]] || ((URL_PORT < 1 || URL_PORT > 65535)); then
        die "bad port '$URL_PORT' in '$1'"
    fi
}

# loopback_listen_address HOST -> prints the address to listen on, fails if HOST is not local
loopback_listen_address() {
    case $1 in
        127.0.0.1 | localhost) echo 127.0.0.1 ;;
        ::1) echo ::1 ;;
        *) return 1 ;;
    esac
}

tcp_open() {
    # shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# nats_info HOST PORT -> prints the server's INFO line; fails if no NATS server answers there
nats_info() {
    # shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        [[ $line == INFO* ]] || exit 1
        printf "%s\n" "$line"' _ "$1" "$2" 2>/dev/null
}

# Print the last lines of a log file, for a failed start.
log_tail() {
    echo "---- last lines of $1 ----" >&2
    tail -n 40 "$1" >&2 2>/dev/null || echo "(no log)" >&2
    echo "----" >&2
}

# Atomically write a record of what we started: record NAME key=value...
record() {
    local name=$1
    shift
    mkdir -p "$STARTED"
    printf '%s\n' "$@" "started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$STARTED/.$name.tmp"
    mv -f "$STARTED/.$name.tmp" "$STARTED/$name"
}

apt_install() { # PACKAGE LABEL
    echo "$2: installing the Debian package '$1' (apt-get install -y $1)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "$1" || { apt-get update && apt-get install -y "$1"; }
}

can_apt_install() { is_root && command -v apt-get >/dev/null 2>&1; }

# ---------------------------------------------------------------------------- PostgreSQL

find_pg_bindir() {
    local d candidates=()
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    while IFS= read -r d; do
        if [[ -d $d ]]; then candidates+=("$d"); fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    if command -v initdb >/dev/null 2>&1; then
        candidates+=("$(dirname "$(command -v initdb)")")
    fi
    for d in "${candidates[@]}"; do
        if [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

find_pg_isready() {
    local d
    if command -v pg_isready >/dev/null 2>&1; then
        command -v pg_isready
        return 0
    fi
    if d=$(find_pg_bindir) && [[ -x $d/pg_isready ]]; then
        echo "$d/pg_isready"
        return 0
    fi
    return 1
}

# pg_probe HOST PORT -> prints up | starting | other | none
pg_probe() {
    local isready rc=0
    if isready=$(find_pg_isready); then
        "$isready" -q -h "$1" -p "$2" -t 3 || rc=$?
        case $rc in
            0) echo up ;;
            1) echo starting ;;
            *) if tcp_open "$1" "$2"; then echo other; else echo none; fi ;;
        esac
    elif tcp_open "$1" "$2"; then
        echo up # no pg_isready on this machine: something listens, assume it is PostgreSQL
    else
        echo none
    fi
}

pg_using() {
    local note=""
    if [[ -f $STARTED/postgres ]] && grep -qx "port=$2" "$STARTED/postgres"; then
        note=" (the private one started earlier by ops/up.sh; ops/down.sh stops it)"
    fi
    echo "postgres: using the server at $1:$2$note"
}

pg_up() {
    parse_url "$DB_URL" 5432
    local host=$URL_HOST port=$URL_PORT user=${URL_USER:-postgres} state deadline listen
    state=$(pg_probe "$host" "$port")
    if [[ $state == starting ]]; then
        deadline=$((SECONDS + WAIT_SECONDS))
        while [[ $state == starting ]] && ((SECONDS < deadline)); do
            sleep 0.3
            state=$(pg_probe "$host" "$port")
        done
    fi
    case $state in
        up)
            pg_using "$host" "$port"
            return 0
            ;;
        starting) die "postgres: the server at $host:$port still rejects connections after" \
            "${WAIT_SECONDS}s (starting up or shutting down?)" ;;
    esac
    if ! listen=$(loopback_listen_address "$host"); then
        die "postgres: the configured server $host:$port (LEDGERFLOW_DATABASE_URL) is unreachable;" \
            "it is not on this machine, so no private server is started. Start it, or point" \
            "LEDGERFLOW_DATABASE_URL at 127.0.0.1 to get a private one."
    fi
    if [[ $state == other ]]; then
        die "postgres: something listens on $host:$port but does not answer as PostgreSQL;" \
            "free the port or change LEDGERFLOW_DATABASE_URL"
    fi

    local bindir
    if ! bindir=$(find_pg_bindir); then
        if can_apt_install; then
            apt_install postgresql postgres
            bindir=$(find_pg_bindir) || die "postgres: installed 'postgresql' but initdb/pg_ctl/postgres are still not found"
            if [[ $(pg_probe "$host" "$port") == up ]]; then # the package may start its own cluster
                pg_using "$host" "$port"
                return 0
            fi
        else
            die "postgres: the PostgreSQL server programs (initdb, pg_ctl, postgres) are not installed." \
                "Install PostgreSQL 15: sudo apt-get install postgresql" \
                "(or: brew install postgresql@15), then run ops/up.sh again."
        fi
    fi

    local pg_dir="$LOCAL/postgres" run=() run_as=$ME
    local data="$pg_dir/data" log="$pg_dir/postgres.log" sock="$pg_dir" tmp_sock=""
    mkdir -p "$pg_dir"
    if is_root; then
        id postgres >/dev/null 2>&1 || die "postgres: running as root, and initdb refuses root, but" \
            "there is no 'postgres' system user. Create one (useradd --system postgres) or run" \
            "ops/up.sh as a normal user."
        run=(runuser -u postgres --)
        run_as=postgres
        chown -R postgres: "$pg_dir"
        "${run[@]}" test -w "$pg_dir" || die "postgres: the 'postgres' user cannot write $pg_dir;" \
            "make the project folder readable and traversable by it (chmod o+x on its parents)."
    fi
    # A unix socket path is limited to ~107 bytes: fall back to a private temporary directory.
    if ((${#sock} + 20 > 107)); then
        tmp_sock=$(mktemp -d "${TMPDIR:-/tmp}/ledgerflow-pg-XXXXXX")
        if is_root; then chown postgres: "$tmp_sock"; fi
        sock=$tmp_sock
    fi

    "${run[@]}" touch "$log" # pg_ctl appends to it as the server's user
    if [[ ! -f $data/PG_VERSION ]]; then
        echo "postgres: creating a private cluster in $data"
        if ! "${run[@]}" "$bindir/initdb" -D "$data" -U postgres --auth-local=trust \
            --auth-host=trust -E UTF8 --no-locale >>"$log" 2>&1; then
            log_tail "$log"
            die "postgres: initdb failed"
        fi
    fi
    # Settings are kept in a file of our own, rewritten on every start.
    {
        echo "# written by ops/up.sh on every start"
        echo "listen_addresses = '$listen'"
        echo "port = $port"
        echo "unix_socket_directories = '${sock//\'/\'\'}'"
    } >"$data/ledgerflow.conf"
    grep -qx "include_if_exists = 'ledgerflow.conf'" "$data/postgresql.conf" ||
        echo "include_if_exists = 'ledgerflow.conf'" >>"$data/postgresql.conf"
    if is_root; then chown postgres: "$data/ledgerflow.conf" "$data/postgresql.conf"; fi

    echo "postgres: starting a private server on $listen:$port (data: $data, log: $log)"
    if ! "${run[@]}" "$bindir/pg_ctl" -D "$data" -l "$log" -W start >/dev/null; then
        log_tail "$log"
        die "postgres: pg_ctl start failed"
    fi
    record postgres "host=$host" "port=$port" "datadir=$data" "bindir=$bindir" \
        "run_as=$run_as" "socket_dir=$sock" "tmp_socket_dir=$tmp_sock" "log=$log"

    local isready started_at=$SECONDS
    isready=$(find_pg_isready) || die "postgres: pg_isready not found (install postgresql-client)"
    deadline=$((SECONDS + WAIT_SECONDS))
    until "$isready" -q -h "$host" -p "$port" -t 2; do
        if ((SECONDS >= deadline)); then
            log_tail "$log"
            die "postgres: the private server did not answer on $host:$port within" \
                "${WAIT_SECONDS}s (it may still be running: ops/down.sh stops it)"
        fi
        if ((SECONDS - started_at >= 3)) && ! "${run[@]}" "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
            rm -f "$STARTED/postgres"
            log_tail "$log"
            die "postgres: the private server exited during startup"
        fi
        sleep 0.2
    done
    local pid
    pid=$(head -n 1 "$data/postmaster.pid")
    record postgres "host=$host" "port=$port" "pid=$pid" "datadir=$data" "bindir=$bindir" \
        "run_as=$run_as" "socket_dir=$sock" "tmp_socket_dir=$tmp_sock" "log=$log"

    # The private cluster has only the `postgres` superuser: add the URL's user, if another.
    if [[ $user != postgres ]]; then
        local psql=$bindir/psql
        [[ -x $psql ]] || psql=$(command -v psql) || die "postgres: psql not found (install postgresql-client)"
        if [[ $user =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]]; then
            "$psql" -q -X -h "$host" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
                -v role="$user" >/dev/null <<'SQL'
SELECT format('CREATE ROLE %I LOGIN SUPERUSER', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SQL
        else
            echo "postgres: warning: not creating the role '$user' from LEDGERFLOW_DATABASE_URL" >&2
        fi
    fi
    echo "postgres: private server ready at $host:$port (pid $pid)"
}

# ---------------------------------------------------------------------------------- NATS

find_nats_server() {
    local c
    for c in "$(command -v nats-server 2>/dev/null || true)" /usr/sbin/nats-server \
        /usr/local/bin/nats-server /usr/bin/nats-server; do
        if [[ -n $c && -x $c ]]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

nats_using() {
    local note=""
    if [[ -f $STARTED/nats ]] && grep -qx "port=$2" "$STARTED/nats"; then
        note=" (the private one started earlier by ops/up.sh; ops/down.sh stops it)"
    fi
    echo "nats: using the server at $1:$2$note"
    if [[ $3 != *'"jetstream":true'* ]]; then
        echo "nats: warning: the server at $1:$2 does not announce JetStream; ledgerflow needs it" \
            "(nats-server -js)" >&2
    fi
}

nats_up() {
    parse_url "$NATS_URL" 4222
    local host=$URL_HOST port=$URL_PORT info listen bin
    if info=$(nats_info "$host" "$port"); then
        nats_using "$host" "$port" "$info"
        return 0
    fi
    if ! listen=$(loopback_listen_address "$host"); then
        die "nats: the configured server $host:$port (LEDGERFLOW_NATS_URL) is unreachable;" \
            "it is not on this machine, so no private server is started. Start it, or point" \
            "LEDGERFLOW_NATS_URL at 127.0.0.1 to get a private one."
    fi
    if tcp_open "$host" "$port"; then
        die "nats: something listens on $host:$port but does not answer as NATS;" \
            "free the port or change LEDGERFLOW_NATS_URL"
    fi
    if ! bin=$(find_nats_server); then
        if can_apt_install; then
            apt_install nats-server nats
            bin=$(find_nats_server) || die "nats: installed 'nats-server' but cannot find the program"
            if info=$(nats_info "$host" "$port"); then # the package may start its own service
                nats_using "$host" "$port" "$info"
                return 0
            fi
        else
            die "nats: nats-server is not installed. Install it: sudo apt-get install nats-server" \
                "(or download a release from https://github.com/nats-io/nats-server/releases)," \
                "then run ops/up.sh again."
        fi
    fi

    local nats_dir="$LOCAL/nats"
    local store="$nats_dir/jetstream" log="$nats_dir/nats.log" pidfile="$nats_dir/nats.pid"
    mkdir -p "$store"
    rm -f "$pidfile"
    echo "nats: starting a private server on $listen:$port (JetStream store: $store, log: $log)"
    # Detached from this shell and its terminal; stdio closed so callers capturing output don't hang.
    nohup "$bin" -js -a "$listen" -p "$port" -sd "$store" -l "$log" -P "$pidfile" \
        </dev/null >>"$nats_dir/nats.out" 2>&1 &
    local pid=$!
    disown "$pid" 2>/dev/null || true
    record nats "host=$host" "port=$port" "pid=$pid" "store_dir=$store" "bin=$bin" "log=$log"

    local deadline=$((SECONDS + WAIT_SECONDS))
    until info=$(nats_info "$host" "$port"); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$STARTED/nats"
            log_tail "$log"
            log_tail "$nats_dir/nats.out"
            die "nats: the private server exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$log"
            die "nats: the private server did not answer on $host:$port within ${WAIT_SECONDS}s" \
                "(it may still be running: ops/down.sh stops it)"
        fi
        sleep 0.2
    done
    echo "nats: private server ready at $host:$port (pid $pid)"
}

mkdir -p "$LOCAL"
pg_up
nats_up
