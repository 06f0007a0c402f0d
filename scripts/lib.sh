# shellcheck shell=bash
# scripts/lib.sh — shell functions shared by scripts/test and scripts/run (sourced, not run).
#
# The sourcing script sets, before calling anything here:
#   NOTIFY_SCRIPT     its name for messages, e.g. scripts/test
#   WAIT_SECS         seconds to wait for each service to accept connections
#   NO_INSTALL        1: never apt-get install (NO_INSTALL_VAR names the setting that said so)
#   AMQP_URL_VAR, DB_URL_VAR   the names of the settings the user changes the URLs with
#                     (messages tell the user to change them)
# and, for ensure_rabbitmq / ensure_postgres, the globals RABBITMQ_URL, DATABASE_URL and
# DATABASE_URL_DEFAULTED (1: DATABASE_URL is the script's default, so a fresh local server may
# be configured for it). ensure_postgres may change DATABASE_URL (it then exports it).

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin"

# ------------------------------------------------------------------------------------ messages
step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '    WARNING: %s\n' "$*" >&2; }
die()  { printf '\n%s: ERROR: %s\n' "$NOTIFY_SCRIPT" "$*" >&2; exit 1; }

# Hide the password of a URL in messages.
redact() { sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#' <<<"$1"; }

# ------------------------------------------------------------------------------ root, packages
# Commands that need root: run directly as root, else through sudo (non-interactive when
# there is no terminal to type a password into).
if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    if [[ -t 0 ]]; then SUDO=(sudo); else SUDO=(sudo -n); fi
else
    SUDO=(false)
fi
as_root() {
    if [[ ${SUDO[0]:-} == false ]]; then
        warn "needs root and sudo is missing: $*"
        return 1
    fi
    "${SUDO[@]}" "$@"
}
as_postgres() {  # run as the postgres OS user (peer auth on the local socket)
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && as_root -u postgres "$@")
    fi
}

systemd_running() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }

APT_UPDATED=0
apt_install() {  # apt_install PKG...  (returns non-zero instead of exiting)
    if [[ ${NO_INSTALL:-0} == 1 ]]; then
        warn "${NO_INSTALL_VAR:-NO_INSTALL}=1: not installing $*"
        return 1
    fi
    command -v apt-get >/dev/null 2>&1 || { warn "apt-get not found: cannot install $*"; return 1; }
    local log
    log=$(mktemp)
    if [[ $APT_UPDATED == 0 ]]; then
        info "apt-get update"
        if ! as_root apt-get update -qq >"$log" 2>&1; then
            sed 's/^/    | /' "$log" | tail -n 20; rm -f "$log"
            warn "apt-get update failed"
            return 1
        fi
        APT_UPDATED=1
    fi
    info "apt-get install $*"
    if ! as_root apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
        sed 's/^/    | /' "$log" | tail -n 20; rm -f "$log"
        warn "apt-get install $* failed"
        return 1
    fi
    rm -f "$log"
}

# ------------------------------------------------------------------------------- URLs, ports
# URL -> host and port (scheme://[user[:pass]@]host[:port][/path][?query]).
url_host() {
    local hp=${1#*://}
    hp=${hp%%/*}; hp=${hp%%\?*}; hp=${hp##*@}
    if [[ $hp == \[* ]]; then hp=${hp#[}; echo "${hp%%]*}"; else echo "${hp%%:*}"; fi
}
url_port() {  # url_port URL DEFAULT
    local hp=${1#*://}
    hp=${hp%%/*}; hp=${hp%%\?*}; hp=${hp##*@}
    [[ $hp == \[* ]] && hp=${hp#*]}
    if [[ $hp == *:* && -n ${hp##*:} ]]; then echo "${hp##*:}"; else echo "$2"; fi
}
is_local() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 || $1 == "" ]]; }

# Does host:port accept a TCP connection? (bash /dev/tcp, bounded)
port_open() {
    timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}
wait_port() {  # wait_port NAME HOST PORT HINT
    local name=$1 host=$2 port=$3 hint=$4 waited=0
    until port_open "$host" "$port"; do
        if (( waited >= WAIT_SECS )); then
            die "$name does not accept connections on $host:$port after ${WAIT_SECS}s. $hint"
        fi
        sleep 1; waited=$((waited + 1))
        if (( waited % 10 == 0 )); then
            info "still waiting for $name on $host:$port (${waited}s)"
        fi
    done
    info "$name accepts connections on $host:$port"
}

# ----------------------------------------------------------------------------------- RabbitMQ
start_rabbitmq() {
    local bin
    bin=$(command -v rabbitmq-server 2>/dev/null || true)
    if [[ -z $bin ]]; then
        info "rabbitmq-server is not installed: installing it (Debian package rabbitmq-server;" \
             "notify's message broker)"
        apt_install rabbitmq-server \
            || die "could not install RabbitMQ. Install it yourself (apt-get install rabbitmq-server)" \
                   "or point ${AMQP_URL_VAR:-RABBITMQ_URL} at a running broker, then run $NOTIFY_SCRIPT again."
    fi
    # apt may have started it already (systemd machines).
    port_open "$AMQP_HOST" "$AMQP_PORT" && return 0
    if systemd_running; then
        info "systemctl start rabbitmq-server"
        as_root systemctl start rabbitmq-server \
            || warn "systemctl start rabbitmq-server failed (see: journalctl -u rabbitmq-server)"
    else
        info "rabbitmq-server -detached"
        # Fails harmlessly when a node is already booting; the wait below decides.
        as_root rabbitmq-server -detached \
            || warn "rabbitmq-server -detached failed (a node may already be starting)"
    fi
}

# Uses whatever accepts connections at RABBITMQ_URL's host:port; starts (and if need be
# installs) the local RabbitMQ when that is this machine and nothing listens. Sets AMQP_HOST,
# AMQP_PORT.
ensure_rabbitmq() {
    local var=${AMQP_URL_VAR:-RABBITMQ_URL}
    step "RabbitMQ at $(redact "$RABBITMQ_URL")"
    AMQP_HOST=$(url_host "$RABBITMQ_URL"); AMQP_HOST=${AMQP_HOST:-127.0.0.1}
    AMQP_PORT=$(url_port "$RABBITMQ_URL" 5672)
    if port_open "$AMQP_HOST" "$AMQP_PORT"; then
        info "already running on $AMQP_HOST:$AMQP_PORT"
    elif is_local "$AMQP_HOST"; then
        info "nothing listens on $AMQP_HOST:$AMQP_PORT: starting the local RabbitMQ"
        start_rabbitmq
        wait_port RabbitMQ "$AMQP_HOST" "$AMQP_PORT" \
            "Look at /var/log/rabbitmq/*.log, start it yourself (rabbitmq-server -detached as root), or raise ${WAIT_VAR:-NOTIFY_TEST_WAIT}."
    else
        die "RabbitMQ at $AMQP_HOST:$AMQP_PORT (from $var) does not accept connections, and it" \
            "is not on this machine so this script cannot start it. Start it, or unset $var to" \
            "use a local broker."
    fi
}

# --------------------------------------------------------------------------------- PostgreSQL
pg_cluster_start() {
    local ver
    ver=$(for d in /etc/postgresql/*/main; do [[ -d $d ]] && basename "$(dirname "$d")"; done \
            | sort -V | tail -1 || true)
    if [[ -z $ver ]]; then
        ver=$(for d in /usr/lib/postgresql/*/bin/postgres; do [[ -x $d ]] && echo "$d" | cut -d/ -f5; done \
                | sort -V | tail -1 || true)
        [[ -n $ver ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql." \
            "Install them (apt-get install postgresql) or set ${DB_URL_VAR:-DATABASE_URL} to a running server."
        info "no cluster yet: pg_createcluster $ver main"
        as_root pg_createcluster "$ver" main 2>&1 | sed 's/^/    | /' \
            || die "pg_createcluster $ver main failed (see above)."
    fi
    if systemd_running; then
        info "systemctl start postgresql@$ver-main"
        as_root systemctl start "postgresql@$ver-main" \
            || warn "systemctl start postgresql@$ver-main failed (see: journalctl -u postgresql@$ver-main)"
    else
        info "pg_ctlcluster --skip-systemctl-redirect $ver main start"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start \
            || warn "pg_ctlcluster $ver main start failed (it may already be starting)"
    fi
}
start_postgres() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
        info "PostgreSQL server is not installed: installing it (Debian package postgresql;" \
             "notify keeps delivery status and the in-app inbox in it)"
        apt_install postgresql \
            || die "could not install PostgreSQL. Install it yourself (apt-get install postgresql)" \
                   "or set ${DB_URL_VAR:-DATABASE_URL} to a running server, then run $NOTIFY_SCRIPT again."
    fi
    port_open "$PG_HOST" "$PG_PORT" && return 0
    pg_cluster_start
}
# psql against DATABASE_URL with the database name replaced.
url_with_db() {  # url_with_db URL DBNAME
    local base=${1%%\?*} query=""
    [[ $1 == *\?* ]] && query="?${1#*\?}"
    local rest=${base#*://}
    if [[ $rest == */* ]]; then base=${base%/*}; fi
    echo "$base/$2$query"
}
url_db() {
    local base=${1%%\?*} rest
    rest=${base#*://}
    if [[ $rest == */* ]]; then echo "${rest##*/}"; fi
}
# -w: never prompt for a password (fail instead).
pg_can_login() { PGCONNECT_TIMEOUT=5 psql -w "$1" -X -q -tAc 'select 1' >/dev/null 2>&1; }

# Uses the PostgreSQL at DATABASE_URL (starting or installing the local one when that is this
# machine and nothing listens), waits for pg_isready, and makes sure DATABASE_URL logs in:
# creates the database when missing and, for a defaulted URL on a fresh local server (Debian's
# default: TCP logins need a password, role postgres has none), creates it and sets role
# postgres's password to `postgres` through the postgres OS account, then uses
# postgres://postgres:postgres@HOST:PORT/DB. Sets PG_HOST, PG_PORT, PG_DB.
ensure_postgres() {
    local var=${DB_URL_VAR:-DATABASE_URL} waited admin_url nopw
    step "PostgreSQL at $(redact "$DATABASE_URL")"
    PG_HOST=$(url_host "$DATABASE_URL"); PG_HOST=${PG_HOST:-127.0.0.1}
    PG_PORT=$(url_port "$DATABASE_URL" 5432)
    PG_DB=$(url_db "$DATABASE_URL"); PG_DB=${PG_DB:-postgres}
    if port_open "$PG_HOST" "$PG_PORT"; then
        info "already running on $PG_HOST:$PG_PORT"
    elif is_local "$PG_HOST"; then
        info "nothing listens on $PG_HOST:$PG_PORT: starting the local PostgreSQL"
        start_postgres
        wait_port PostgreSQL "$PG_HOST" "$PG_PORT" \
            "Look at /var/log/postgresql/, start it yourself (pg_ctlcluster <version> main start), or raise ${WAIT_VAR:-NOTIFY_TEST_WAIT}."
    else
        die "PostgreSQL at $PG_HOST:$PG_PORT (from $var) does not accept connections, and it" \
            "is not on this machine so this script cannot start it. Start it, or unset $var."
    fi
    if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
        info "pg_isready/psql are missing: installing them (Debian package postgresql-client;" \
             "this script checks the server and the login with them)"
        apt_install postgresql-client \
            || die "pg_isready/psql are missing. Install postgresql-client, then run $NOTIFY_SCRIPT again."
    fi
    waited=0
    until pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2; do
        if (( waited >= WAIT_SECS )); then
            die "PostgreSQL on $PG_HOST:$PG_PORT accepts TCP but is not ready after ${WAIT_SECS}s" \
                "(pg_isready). Look at /var/log/postgresql/, or raise ${WAIT_VAR:-NOTIFY_TEST_WAIT}."
        fi
        sleep 1; waited=$((waited + 1))
    done
    info "pg_isready: $PG_HOST:$PG_PORT accepts connections"

    if ! pg_can_login "$DATABASE_URL"; then
        admin_url=$(url_with_db "$DATABASE_URL" postgres)
        if pg_can_login "$admin_url"; then
            info "database \"$PG_DB\" is missing: creating it"
            psql -w "$admin_url" -X -q -c "CREATE DATABASE \"$PG_DB\"" >/dev/null \
                || die "cannot create database \"$PG_DB\" as $(redact "$DATABASE_URL"). Create it" \
                       "(createdb $PG_DB) or give the user CREATEDB, then run $NOTIFY_SCRIPT again."
        elif [[ $DATABASE_URL_DEFAULTED == 1 ]] && is_local "$PG_HOST" \
                && pg_can_login "postgres://postgres:postgres@$PG_HOST:$PG_PORT/$PG_DB"; then
            # An earlier run set up a fresh server this way (see below).
            DATABASE_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/$PG_DB
            export DATABASE_URL
        elif [[ $DATABASE_URL_DEFAULTED == 1 ]] && is_local "$PG_HOST"; then
            # A fresh Debian install: role postgres has no password and TCP logins need one.
            # Fix it through the postgres OS account (peer auth on the local socket).
            info "cannot log in as $(redact "$DATABASE_URL"): configuring the local server"
            if ! as_postgres psql -X -q -p "$PG_PORT" -tAc 'select 1' >/dev/null 2>&1; then
                die "cannot log in to the local PostgreSQL, neither as $(redact "$DATABASE_URL") nor as" \
                    "the postgres OS user. Set $var to a URL that works (user with CREATEDB)."
            fi
            if [[ -z $(as_postgres psql -X -p "$PG_PORT" -tAc "select 1 from pg_database where datname = '$PG_DB'") ]]; then
                info "creating database \"$PG_DB\""
                as_postgres psql -X -q -p "$PG_PORT" -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
            fi
            if ! pg_can_login "$DATABASE_URL"; then
                nopw=$(as_postgres psql -X -p "$PG_PORT" -tAc "select rolpassword is null from pg_authid where rolname = 'postgres'")
                if [[ $nopw == t ]]; then
                    info "role postgres has no password: setting it to 'postgres' (local development server only)"
                    as_postgres psql -X -q -p "$PG_PORT" -c "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
                    DATABASE_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/$PG_DB
                    export DATABASE_URL
                elif pg_can_login "postgres://postgres:postgres@$PG_HOST:$PG_PORT/$PG_DB"; then
                    # An earlier run set the password; only this database was missing.
                    DATABASE_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/$PG_DB
                    export DATABASE_URL
                fi
            fi
        fi
        pg_can_login "$DATABASE_URL" \
            || die "cannot log in to PostgreSQL as $(redact "$DATABASE_URL"): $(PGCONNECT_TIMEOUT=5 psql -w "$DATABASE_URL" -X -tAc 'select 1' 2>&1 | head -1)." \
                   "Set $var to a user (with CREATEDB) and database that work, then run $NOTIFY_SCRIPT again."
    fi
    info "logged in as $(redact "$DATABASE_URL")"
}
