#!/bin/sh
# Entrypoint of the `cluster` profile's RabbitMQ nodes (docker-compose.yml).
#
# Nodes of one cluster (and the CLI tools the healthcheck runs) must share one Erlang cookie.
# RabbitMQ 4.x images no longer take it from RABBITMQ_ERLANG_COOKIE, and Erlang refuses a cookie
# file that others can read, which a bind-mounted file from a git checkout is. So the shared
# cookie is mounted read-only at /run/notify/erlang.cookie and copied here to where the server
# and the CLI tools (root's ~/.erlang.cookie links to it) look, owner-only; the image's entrypoint
# then hands /var/lib/rabbitmq to the rabbitmq user and starts the server as that user.
set -eu
umask 077
tr -d ' \r\n' < /run/notify/erlang.cookie > /var/lib/rabbitmq/.erlang.cookie
chmod 600 /var/lib/rabbitmq/.erlang.cookie
exec docker-entrypoint.sh "$@"
