#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: start the local one, or install it first.
set -euo pipefail
host=127.0.0.1
port=${INFERQ_BROKER_PORT:-5672}

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if answers; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not installed: installing rabbitmq-server with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "starting RabbitMQ" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 120); do
  if answers; then
    # The port opens a moment before the broker accepts logins.
    rabbitmqctl await_startup >/dev/null 2>&1 || sleep 2
    exit 0
  fi
  sleep 0.5
done
echo "RabbitMQ did not start listening on $host:$port within 60s" >&2
exit 1
