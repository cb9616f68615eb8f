# Sourced by scripts/test and benches/run: finds (or installs) the PostgreSQL server
# binaries and starts a throwaway cluster, removed on exit. As root the server runs as the
# `postgres` user (PostgreSQL refuses root).
#   start_cluster durable|fast   sets PG_URL (maintenance database), PG_BIN, PG_WORK

log() { printf '\n==> %s\n' "$*" >&2; }

find_pg_bin() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    PG_BIN="$(dirname "$(readlink -f "$(command -v initdb)")")"
  else
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing the PostgreSQL server (apt-get)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
      PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    else
      echo "PostgreSQL server binaries (initdb, pg_ctl) are needed: install PostgreSQL 13 or newer" >&2
      exit 1
    fi
  fi
}

start_cluster() {
  local mode="$1"
  find_pg_bin
  PG_WORK="$(mktemp -d /tmp/amplog-pg.XXXXXX)"
  chmod 755 "$PG_WORK"
  PG_AS=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    chown postgres: "$PG_WORK"
    PG_AS=(runuser -u postgres --)
  fi
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)))"
  trap stop_cluster EXIT
  local settings="-c listen_addresses=127.0.0.1 -p $port -k $PG_WORK -c max_connections=400 -c shared_buffers=512MB"
  if [ "$mode" = fast ]; then
    # Tests only: this cluster lives for one run, durability buys nothing.
    settings="$settings -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  log "starting a throwaway PostgreSQL ($mode) on 127.0.0.1:$port in $PG_WORK"
  "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_WORK/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
  "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_WORK/data" -l "$PG_WORK/postgres.log" -w -o "$settings" start >/dev/null
  PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

stop_cluster() {
  if [ -n "${PG_WORK:-}" ]; then
    "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_WORK"
  fi
}
