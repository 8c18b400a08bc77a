#!/bin/sh
# The tideserve images' entrypoint: runs `tideserve "$@"`.
#
# A worker (command `prefill` or `decode`) takes its container's hostname as its worker id
# (TIDESERVE_WORKER_ID) and as the address other workers reach its KV socket at
# (TIDESERVE_HOST), unless the environment already sets them; flags on the command line win
# over both. `docker compose up` names the replicas of a service (deploy.replicas) only in
# their container names, which the command cannot know; the hostname (the short container id)
# is unique, Docker's DNS resolves it on the project network, and the docker actuator can stop
# the container by it.
set -eu

command=""
skip_value=false
for arg in "$@"; do
    if $skip_value; then
        skip_value=false
        continue
    fi
    case "$arg" in
        --log-level) skip_value=true ;;  # the one option before the command that takes a value
        -*) ;;
        *)
            command="$arg"
            break
            ;;
    esac
done

case "$command" in
    prefill | decode)
        name="${HOSTNAME:-$(cat /etc/hostname)}"
        export TIDESERVE_WORKER_ID="${TIDESERVE_WORKER_ID:-$name}"
        export TIDESERVE_HOST="${TIDESERVE_HOST:-$name}"
        ;;
esac

exec tideserve "$@"
