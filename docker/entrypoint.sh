#!/bin/sh
# Container entry point: `darex serve` bound on all interfaces, one worker.
#
# One uvicorn worker per container: each worker process would load its own copy
# of the base model. Scale out with more containers sharing Redis and /data.
#
#   (no arguments)       darex serve --host $DAREX_HOST --port $DAREX_PORT
#   --flag ...           the same, with extra flags for `darex serve`
#   any other command    run as given (e.g. `darex config`, `sh`)
set -eu

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- darex serve --host "${DAREX_HOST:-0.0.0.0}" --port "${DAREX_PORT:-8000}" "$@"
fi
exec "$@"
