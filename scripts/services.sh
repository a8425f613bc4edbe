#!/usr/bin/env bash
# Install (if missing) and start (if down), on loopback only, everything mikkoo and its
# tests need: PostgreSQL (15 on Debian 12) with the pgq extension, the pgqd ticker daemon, RabbitMQ,
# and (for the TLS tests) a listener in front of RabbitMQ that requires client
# certificates.
#
# Idempotent: running it again on a machine where everything is up changes nothing.
# Meant for a Debian 12 machine, run as root (as CI and the quick start do). On other
# Debian-based systems (Ubuntu) it uses the distribution's PostgreSQL version, or
# $PG_VERSION when set.
set -euo pipefail

PG_VERSION=${PG_VERSION:-}
PG_PORT=5432
PGQD_CONF=/etc/pgqd-mikkoo.ini
PGQD_LOG=/var/log/postgresql/pgqd-mikkoo.log
PGQD_PID=/run/postgresql/pgqd-mikkoo.pid

# Throw-away certificates for the TLS tests (a CA, a second "wrong" CA, server and
# client certificates, an encrypted client key). Test material only: never use it for
# anything real.
TLS_DIR=/var/lib/mikkoo-test-tls
TLS_KEY_PASSWORD=k3y-pass-9f2c
# Bumped when the material changes, so an older set is made again.
TLS_VERSION=3
CERTIFICATES_CHANGED=0
# RabbitMQ applies one set of ssl_options to all its AMQP listeners, so its own TLS
# listener (5671) verifies client certificates only when presented. The listener that
# requires them is stunnel on 5673, terminating TLS and forwarding to RabbitMQ's 5672.
CLIENT_CERT_PORT=5673
STUNNEL_CONF=/etc/mikkoo-test-stunnel.conf
STUNNEL_PID=/run/mikkoo-test-stunnel.pid
STUNNEL_LOG=/var/log/mikkoo-test-stunnel.log

log() { printf 'services: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it installs packages and starts servers)"
    exit 1
  fi
}

apt_updated=0
apt_refresh() {
  if [ $apt_updated -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
}

# Installs packages without letting their maintainer scripts start services (there may
# be no init system, as in containers): this script starts what it needs itself.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_refresh
  log "installing ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
  fi
  local status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  [ $added_policy -eq 1 ] && rm -f "$policy"
  return $status
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "$what did not come up within ${seconds}s"
      exit 1
    fi
    sleep 0.5
  done
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() {
  apt_install "postgresql-$PG_VERSION" "postgresql-$PG_VERSION-pgq3" pgqd openssl
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -q "^$PG_VERSION main$"; then
    log "creating PostgreSQL $PG_VERSION cluster"
    pg_createcluster "$PG_VERSION" main --port "$PG_PORT" >/dev/null
  fi
  local conf_dir=/etc/postgresql/$PG_VERSION/main
  # Loopback only, trust auth for local tests (the machine's own setup uses the same).
  if ! grep -q '^# mikkoo services' "$conf_dir/pg_hba.conf"; then
    log "allowing trust auth on loopback"
    local tmp
    tmp=$(mktemp)
    {
      echo '# mikkoo services: trust on loopback for local development and tests'
      echo 'local all all trust'
      echo 'host all all 127.0.0.1/32 trust'
      echo 'host all all ::1/128 trust'
      cat "$conf_dir/pg_hba.conf"
    } >"$tmp"
    cat "$tmp" >"$conf_dir/pg_hba.conf"
    rm -f "$tmp"
    postgres_up && pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main reload
  fi
  if ! grep -q "^listen_addresses = 'localhost'" "$conf_dir/postgresql.conf" \
    && ! grep -q "^listen_addresses" "$conf_dir/conf.d/"*.conf 2>/dev/null; then
    echo "listen_addresses = 'localhost'" >"$conf_dir/conf.d/mikkoo-listen.conf"
  fi
  if ! postgres_up; then
    log "starting PostgreSQL $PG_VERSION"
    pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start
  fi
  wait_for 60 PostgreSQL postgres_up
  # pgq lives per database; the relay creates it nowhere by itself (it is a schema change),
  # so the databases the tests and the quick start use get it here.
  for db in postgres; do
    PGOPTIONS='-c client_min_messages=warning' psql -q -h 127.0.0.1 -U postgres -d "$db" -c 'CREATE EXTENSION IF NOT EXISTS pgq' >/dev/null
  done
}

pgqd_up() { [ -f "$PGQD_PID" ] && kill -0 "$(cat "$PGQD_PID")" 2>/dev/null; }

start_pgqd() {
  if [ ! -f "$PGQD_CONF" ]; then
    cat >"$PGQD_CONF" <<INI
; written by mikkoo's scripts/services.sh
[pgqd]
base_connstr = host=127.0.0.1 port=$PG_PORT user=postgres
initial_database = postgres
logfile = $PGQD_LOG
pidfile = $PGQD_PID
INI
  fi
  if ! pgqd_up; then
    log "starting pgqd"
    mkdir -p "$(dirname "$PGQD_PID")"
    chown postgres:postgres "$(dirname "$PGQD_PID")" 2>/dev/null || true
    rm -f "$PGQD_PID"
    pgqd -d "$PGQD_CONF"
    wait_for 20 pgqd pgqd_up
  fi
}

rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; }
tcp_open() { bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

start_rabbitmq() {
  apt_install rabbitmq-server
  local env_file=/etc/rabbitmq/rabbitmq-env.conf conf_file=/etc/rabbitmq/rabbitmq.conf
  if ! grep -q 'NODENAME=rabbit@localhost' "$env_file" 2>/dev/null; then
    log "configuring RabbitMQ for loopback"
    cat >"$env_file" <<'ENV'
NODENAME=rabbit@localhost
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
ENV
  fi
  if ! grep -q '^listeners.tcp' "$conf_file" 2>/dev/null; then
    echo 'listeners.tcp.local = 127.0.0.1:5672' >>"$conf_file"
  fi
  if configure_rabbitmq_tls && rabbitmqctl -q status >/dev/null 2>&1; then
    log "restarting RabbitMQ to open the TLS listener"
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    wait_for 60 "RabbitMQ to stop" sh -c '! rabbitmqctl -q status'
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    wait_for 120 "RabbitMQ node" rabbitmqctl -q status
  fi
  # The node can run with the app stopped (a test may have called stop_app and died).
  if ! rabbit_up; then
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
  fi
  wait_for 120 "RabbitMQ on 127.0.0.1:5672" rabbit_up
  wait_for 60 "RabbitMQ's TLS listener on 127.0.0.1:5671" tcp_open 5671
  if [ "$CERTIFICATES_CHANGED" = 1 ]; then
    # RabbitMQ caches certificate files; new ones must be read again.
    rabbitmqctl -q eval 'ssl:clear_pem_cache().' >/dev/null
  fi
}

install_build_dependencies() {
  # What building mikkoo needs besides the Rust toolchain: OpenSSL headers for the
  # TLS connectors, and the clients the scripts use.
  apt_install pkg-config libssl-dev gcc postgresql-client-$PG_VERSION
}

make_test_certificates() {
  [ "$(cat "$TLS_DIR/.complete" 2>/dev/null)" = "$TLS_VERSION" ] && return 0
  log "creating throw-away TLS certificates in $TLS_DIR"
  rm -rf "$TLS_DIR" && mkdir -p "$TLS_DIR/ca-dir" && chmod 755 "$TLS_DIR"
  (
    cd "$TLS_DIR"
    quiet() { "$@" >/dev/null 2>&1; }
    quiet openssl req -x509 -new -nodes -newkey rsa:2048 -days 3650 -subj "/CN=mikkoo test CA" \
      -keyout ca.key -out ca.pem
    quiet openssl req -x509 -new -nodes -newkey rsa:2048 -days 3650 -subj "/CN=some other CA" \
      -keyout other-ca.key -out other-ca.pem
    # The server certificate names only "localhost": reaching a server as 127.0.0.1 is a
    # host-name mismatch, which the tests use.
    printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
    quiet openssl req -new -nodes -newkey rsa:2048 -subj "/CN=localhost" -keyout server.key -out server.csr
    quiet openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    quiet openssl req -new -nodes -newkey rsa:2048 -subj "/CN=mikkoo test client" -keyout client.key -out client.csr
    quiet openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out client.pem
    quiet openssl pkey -in client.key -aes256 -passout "pass:$TLS_KEY_PASSWORD" -out client-encrypted.key
    cp ca.pem ca-dir/ && quiet openssl rehash ca-dir
    install -o rabbitmq -g rabbitmq -m 0600 server.key rabbitmq-server.key
    install -o postgres -g postgres -m 0600 server.key postgres-server.key
    chmod 0644 ./*.pem client.key client-encrypted.key
  )
  echo "$TLS_VERSION" >"$TLS_DIR/.complete"
  CERTIFICATES_CHANGED=1
}

# Writes RabbitMQ's TLS listener (127.0.0.1:5671; client certificates verified when
# presented). Returns 0 when the configuration changed.
configure_rabbitmq_tls() {
  local conf_file=/etc/rabbitmq/rabbitmq.conf
  grep -q '^listeners.ssl.default' "$conf_file" 2>/dev/null && return 1
  log "adding RabbitMQ's TLS listener on 127.0.0.1:5671"
  cat >>"$conf_file" <<CONF
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/rabbitmq-server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
CONF
  return 0
}

# Alive, and stunnel: a stale pidfile's number may belong to another process by now.
stunnel_up() {
  local pid
  pid=$(cat "$STUNNEL_PID" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q '^stunnel' "/proc/$pid/comm" 2>/dev/null
}
stunnel_down() { ! stunnel_up; }

# Starts (or, after new certificates or a changed configuration, restarts) the TLS
# listener on 127.0.0.1:$CLIENT_CERT_PORT that refuses clients without a certificate
# signed by the test CA.
start_client_certificate_listener() {
  apt_install stunnel4
  local wanted
  wanted=$(cat <<CONF
; written by mikkoo's scripts/services.sh: TLS in front of RabbitMQ, client
; certificates required
pid = $STUNNEL_PID
output = $STUNNEL_LOG
[amqps-client-certificate-required]
accept = 127.0.0.1:$CLIENT_CERT_PORT
connect = 127.0.0.1:5672
cert = $TLS_DIR/server.pem
key = $TLS_DIR/server.key
CAfile = $TLS_DIR/ca.pem
verifyChain = yes
requireCert = yes
CONF
)
  if [ "$(cat "$STUNNEL_CONF" 2>/dev/null)" != "$wanted" ] || [ "$CERTIFICATES_CHANGED" = 1 ]; then
    printf '%s\n' "$wanted" >"$STUNNEL_CONF"
    if stunnel_up; then
      log "restarting the client-certificate TLS listener"
      kill "$(cat "$STUNNEL_PID")"
      wait_for 20 "the old stunnel to stop" stunnel_down
    fi
  fi
  if ! stunnel_up; then
    log "starting the client-certificate TLS listener on 127.0.0.1:$CLIENT_CERT_PORT"
    rm -f "$STUNNEL_PID"
    stunnel "$STUNNEL_CONF"
    wait_for 20 "stunnel" stunnel_up
  fi
  wait_for 20 "the TLS listener on 127.0.0.1:$CLIENT_CERT_PORT" tcp_open "$CLIENT_CERT_PORT"
}

configure_postgres_tls() {
  local conf=/etc/postgresql/$PG_VERSION/main/conf.d/mikkoo-ssl.conf
  if [ -f "$conf" ]; then
    # New certificates under an unchanged configuration: have the server read them.
    if [ "$CERTIFICATES_CHANGED" = 1 ] && postgres_up; then
      pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main reload
    fi
    return 0
  fi
  log "giving PostgreSQL the test CA's server certificate"
  cat >"$conf" <<CONF
# written by mikkoo's scripts/services.sh: TLS with the test CA's certificate
ssl = on
ssl_cert_file = '$TLS_DIR/server.pem'
ssl_key_file = '$TLS_DIR/postgres-server.key'
CONF
  if postgres_up; then
    pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main reload
  fi
}

# PostgreSQL's major version: $PG_VERSION when set, else that of the cluster already
# on $PG_PORT, else the distribution's default (15 on Debian 12, 16 on Ubuntu 24.04).
choose_pg_version() {
  [ -n "$PG_VERSION" ] && return 0
  # `|| true`: on a fresh machine pg_lsclusters is not installed yet.
  PG_VERSION=$(pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1; exit }' || true)
  [ -n "$PG_VERSION" ] && return 0
  apt-cache show postgresql >/dev/null 2>&1 || apt_refresh
  PG_VERSION=$(apt-cache depends postgresql 2>/dev/null | sed -n 's/^ *Depends: postgresql-\([0-9][0-9]*\)$/\1/p' | head -n 1 || true)
  if [ -z "$PG_VERSION" ]; then
    log "cannot tell which PostgreSQL version to install; set PG_VERSION"
    exit 1
  fi
}

need_root
choose_pg_version
install_build_dependencies
make_test_certificates
configure_postgres_tls
start_postgres
start_pgqd
start_rabbitmq
start_client_certificate_listener
log "ready: PostgreSQL $PG_VERSION on 127.0.0.1:$PG_PORT (pgq), pgqd, RabbitMQ on 127.0.0.1:5672 (TLS: 5671, client certificates required: $CLIENT_CERT_PORT)"
