# A private throw-away PostgreSQL cluster, sourced by scripts/test (the registry tests),
# bench/fleet-scale and bench/liveness-pg: installs the server when missing, starts a cluster on a
# free loopback port, stops and deletes it on exit. Settings: PG_CPU pins the server to that CPU
# (benchmarks; unset: not pinned); PG_NICE puts the server's scheduler group (its session's
# autogroup: the postmaster and every backend) at that nice value, below a fleet sharing its core,
# as `CPUWeight=` on its unit would (benchmarks; unset: 0); PG_OPTIONS adds server options (the
# tests pass `-c fsync=off`; benchmarks keep fsync on, their writes are measured durable). After
# `private_pg_start`, $pg_url is its URL. postgres refuses to run as root: runuser.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

private_pg_install() {
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$pg_bin" ]; then
    echo "==> apt-get install postgresql"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  fi
}

private_pg_stop() {
  as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast stop >/dev/null 2>&1 || true
  as_root rm -rf "$pg_dir"
}

private_pg_start() {
  if [ -n "${PG_NICE:-}" ] && ! [[ "$PG_NICE" =~ ^-?[0-9]+$ ]]; then
    echo "error: PG_NICE=$PG_NICE is not a nice value (-20 to 19)" >&2
    exit 1
  fi
  [ -n "${pg_bin:-}" ] || private_pg_install
  pg_dir=$(mktemp -d /tmp/hearth-pg.XXXXXX)
  chmod 755 "$pg_dir"
  pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_root chown postgres "$pg_dir"
  trap private_pg_stop EXIT
  as_pg "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 >"$pg_dir/initdb.log" 2>&1 \
    || { cat "$pg_dir/initdb.log" >&2; exit 1; }
  local pin=()
  [ -z "${PG_CPU:-}" ] || pin=(taskset -c "$PG_CPU")
  as_pg "${pin[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w \
    -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 ${PG_OPTIONS:-}" start >/dev/null
  pg_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
  if [ -n "${PG_NICE:-}" ]; then
    # pg_ctl starts the server in a session of its own, so its autogroup holds only the server.
    local pid
    pid=$(head -n1 "$pg_dir/data/postmaster.pid")
    as_root sh -c "echo $PG_NICE > /proc/$pid/autogroup" \
      || { echo "error: cannot set the PostgreSQL server's autogroup nice (kernel.sched_autogroup_enabled?)" >&2; exit 1; }
  fi
  echo "==> PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on port $pg_port${PG_CPU:+ (CPU $PG_CPU)}${PG_NICE:+ (autogroup nice $PG_NICE)}"
}
