#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the tests: `start` prints the environment to export, `stop DIR`
# stops it and removes its files.
#
#   eval "$(.ci/postgres.sh start)"      # sets WATCHER_TEST_PG_URL and WATCHER_TEST_PG_DIR
#   pytest -q                            # the PostgreSQL half of the suite now runs
#   .ci/postgres.sh stop "$WATCHER_TEST_PG_DIR"
#
# The cluster runs as the `postgres` user (never as root): initdb into a temporary directory, a free
# port on 127.0.0.1, password authentication over TCP (the tests pass the password the way an
# operator would), and durability switched off (a test cluster is thrown away, so fsync buys nothing).
# When no PostgreSQL is installed, it is installed with apt-get (as root).
set -euo pipefail

pg_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$bin" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql, as root)" >&2
            exit 1
        fi
        echo "postgres.sh: installing PostgreSQL with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq postgresql >&2
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    echo "$bin"
}

# Run a command as the postgres user when we are root, as ourselves otherwise.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        fi
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local bin dir port password
    bin=$(pg_bin)
    dir=$(mktemp -d /tmp/watcher-pg.XXXXXX)
    chmod 755 "$dir"
    mkdir "$dir/data" "$dir/run"
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    printf '%s\n' "$password" >"$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        chown -R postgres "$dir"
    fi
    chmod 600 "$dir/pwfile"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }
    rm -f "$dir/pwfile"
    port=$(free_port)
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $port -k $dir/run -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >&2 || {
        cat "$dir/postgres.log" >&2
        exit 1
    }
    echo "$bin" >"$dir/bin"
    echo "export WATCHER_TEST_PG_DIR=$dir"
    echo "export WATCHER_TEST_PG_URL=postgresql://postgres:$password@127.0.0.1:$port/postgres"
}

stop() {
    local dir=${1:?usage: postgres.sh stop DIR}
    [ -d "$dir/data" ] || return 0
    as_pg "$(cat "$dir/bin")/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *)
        echo "usage: $0 start | stop DIR" >&2
        exit 2
        ;;
esac
