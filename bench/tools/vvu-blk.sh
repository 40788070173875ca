#!/usr/bin/env bash
# Our vhost-user-blk served through the virtio-vhost-user device, as one "back-end" for
# bench/blk_fio.py: the device listens on SOCK (the consumer's vhost-user socket) and the
# appliance (vhost-user-blk --vvu) drives it. Both inherit the caller's CPU affinity.
#   bench/tools/vvu-blk.sh SOCK IMG [extra vhost-user-blk options, e.g. --poll]
set -euo pipefail
sock=$1 img=$2
shift 2
vfu="$sock.vfu"
blk="" dev=""
py=${PYTHON:-python3}
"$py" -m vhostuser.cli.vvu_device --socket-path "$sock.tmp" --vfio-user-socket "$vfu" &
dev=$!
stop() {  # exit 0 when both stopped cleanly, 1 otherwise
  kill -TERM ${blk:-} ${dev:-} 2>/dev/null
  rc=0
  for p in ${blk:-} ${dev:-}; do wait "$p" || rc=1; done
  rm -f "$sock"
  exit $rc
}
trap stop TERM INT
while [ ! -S "$vfu" ]; do sleep 0.05; done
"$py" -m vhostuser.cli.blk --vvu "$vfu" --blk-file "$img" "$@" &
blk=$!
sleep 1  # let the appliance bring the device up (BACKEND_UP) before fio connects
ln -sf "$sock.tmp" "$sock"  # the socket appears for the benchmark only now
wait $dev || true
stop
