#!/usr/bin/env bash
# qemu-storage-daemon, unmodified, behind vhost-user-vvu-bridge and the virtio-vhost-user
# device, as one "back-end" for bench/blk_fio.py: the device listens on SOCK (the consumer's
# vhost-user socket); the bridge drives it and starts QSD on its own socket. All inherit
# the caller's CPU affinity.
#   bench/tools/vvu-bridge.sh SOCK 'QSD COMMAND, {backend} for its socket' [bridge options]
set -euo pipefail
sock=$1 qsd=$2
shift 2
vfu="$sock.vfu" back="$sock.qsd"
bridge="" dev=""
py=${PYTHON:-python3}
"$py" -m vhostuser.cli.vvu_device --socket-path "$sock.tmp" --vfio-user-socket "$vfu" &
dev=$!
stop() {  # exit 0 when both stopped cleanly, 1 otherwise
  kill -TERM ${bridge:-} ${dev:-} 2>/dev/null
  rc=0
  for p in ${bridge:-} ${dev:-}; do wait "$p" || rc=1; done
  rm -f "$sock"
  exit $rc
}
trap stop TERM INT
while [ ! -S "$vfu" ]; do sleep 0.05; done
"$py" -m vhostuser.cli.vvu_bridge --vvu "$vfu" --backend-socket "$back" \
  --backend-cmd "${qsd//\{backend\}/$back}" "$@" &
bridge=$!
sleep 1  # let the bridge bring the device up (BACKEND_UP) before fio connects
ln -sf "$sock.tmp" "$sock"  # the socket appears for the benchmark only now
wait $dev || true
stop
