# Sourced by scripts/test and benches/run: finds (or installs) the tansu Kafka-protocol
# broker and starts a throwaway one on a free loopback port, stopped on exit.
#   start_broker [sqlite|memory]   sets KAFKA_BROKERS (host:port), TANSU_BIN, KAFKA_WORK
# tansu 0.6.0 from crates.io; the cold build takes ~13 minutes on 2 cores, so it is built
# only when `tansu` is not on PATH. Storage is sqlite (feature `libsql`): it survives a
# broker restart, and unlike tansu's in-memory storage (`dynostore`) it serves a fetch that
# starts inside a record batch, which a consumer group resuming from a committed offset
# needs (measured: memory storage returned nothing for offset 1 of a two-record batch).

TANSU_VERSION=0.6.0
TANSU_FEATURES=dynostore,libsql

find_tansu() {
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    TANSU_BIN="$(command -v tansu)"
    return
  fi
  log "installing tansu $TANSU_VERSION (cargo install, features $TANSU_FEATURES; ~13 minutes cold)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES" --quiet
  TANSU_BIN="$(command -v tansu || echo "$HOME/.cargo/bin/tansu")"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port="$1"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "tansu did not listen on 127.0.0.1:$port; its log:" >&2
  cat "$KAFKA_WORK/tansu.log" >&2 || true
  exit 1
}

start_broker() {
  local storage=sqlite://tansu.db
  # In memory: reads far faster (benchmarks), but no resuming inside a record batch.
  [ "${1:-sqlite}" = memory ] && storage=memory://tansu/
  find_tansu
  KAFKA_WORK="$(mktemp -d /tmp/amplog-kafka.XXXXXX)"
  local port
  port="$(free_port)"
  log "starting a throwaway tansu broker on 127.0.0.1:$port ($storage)"
  # Advertise 127.0.0.1, not localhost: librdkafka may resolve localhost to ::1.
  # The sqlite path is relative to the broker's working folder.
  (cd "$KAFKA_WORK" && exec "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$storage" >tansu.log 2>&1) &
  KAFKA_PID=$!
  wait_port "$port"
  KAFKA_BROKERS="127.0.0.1:$port"
}

stop_broker() {
  if [ -n "${KAFKA_PID:-}" ]; then
    kill "$KAFKA_PID" 2>/dev/null || true
    wait "$KAFKA_PID" 2>/dev/null || true
  fi
  [ -n "${KAFKA_WORK:-}" ] && rm -rf "$KAFKA_WORK"
  return 0
}
