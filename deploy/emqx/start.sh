#!/bin/sh
# Starts one EMQX node of deploy/emqx/compose.emqx.yaml: writes its configuration from the
# template (deploy/emqx/emqx.conf, the hook token filled in) and the bootstrap CSV holding the
# edgeloop server's account, then runs the image's own entrypoint and command.
#
#   EDGELOOP_BROKER_HOOK_TOKEN   the token the hook routes expect (the server's setting of that name)
#   EDGELOOP_MQTT_USERNAME       the server's broker account (default _edgeloop-server)
#   EDGELOOP_MQTT_PASSWORD       its password
#   EDGELOOP_EMQX_TEMPLATE       the template (default /edgeloop/emqx.conf)
#   EDGELOOP_EMQX_ETC            where EMQX reads emqx.conf (default /opt/emqx/etc)
#
# With EDGELOOP_EMQX_RENDER_ONLY=1 it writes the files and exits (how the tests check it).
set -eu

template="${EDGELOOP_EMQX_TEMPLATE:-/edgeloop/emqx.conf}"
etc="${EDGELOOP_EMQX_ETC:-/opt/emqx/etc}"
user="${EDGELOOP_MQTT_USERNAME:-_edgeloop-server}"
token="${EDGELOOP_BROKER_HOOK_TOKEN:-}"
password="${EDGELOOP_MQTT_PASSWORD:-}"

# Both end up in files EMQX parses (HOCON, CSV) and go through sed: a conservative alphabet.
check() {
  case "$2" in
    "") echo "start.sh: $1 is not set" >&2; exit 2 ;;
    *[!A-Za-z0-9._~-]*) echo "start.sh: $1 may hold only A-Z a-z 0-9 . _ ~ - (a long random string)" >&2; exit 2 ;;
  esac
}
check EDGELOOP_BROKER_HOOK_TOKEN "$token"
check EDGELOOP_MQTT_PASSWORD "$password"
check EDGELOOP_MQTT_USERNAME "$user"
if [ "${#token}" -lt 32 ]; then
  echo "start.sh: EDGELOOP_BROKER_HOOK_TOKEN is shorter than 32 characters" >&2
  exit 2
fi

umask 077
sed "s/@EDGELOOP_BROKER_HOOK_TOKEN@/$token/g" "$template" > "$etc/emqx.conf.new"
mv "$etc/emqx.conf.new" "$etc/emqx.conf"
printf 'user_id,password,is_superuser\n%s,%s,true\n' "$user" "$password" > "$etc/edgeloop-server-account.csv"

if [ "${EDGELOOP_EMQX_RENDER_ONLY:-0}" = "1" ]; then
  exit 0
fi
exec /usr/bin/docker-entrypoint.sh /opt/emqx/bin/emqx foreground
