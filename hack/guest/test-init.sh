#!/bin/busybox sh
# Throw-away test /init for the microVM guest image (NOT the real agent).
# Used only by `KUASAR_GUEST_TEST_INIT=1 hack/build-guest-image.sh OUTDIR`,
# which then also puts a static /bin/busybox into the image. It does what the
# real agent does at start-up, minus switch_root: mounts proc/sys/devtmpfs,
# loads /lib/modules/*.ko in /etc/modules.order, mounts the 9p tag `share` at
# /mnt, finds the virtio-serial port named `agent`, writes
# "READY <uname -r>" and then serves lines:
#   RUN <cmd>  -> cmd's output, then "END rc=N"
#   POWEROFF   -> "BYE", then power off (qemu exits: -no-reboot)
#   other      -> "echo: <line>"
B=/bin/busybox
export PATH=/bin
$B --install -s /bin
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
$B mount -t tmpfs tmpfs /tmp
$B mount -t tmpfs tmpfs /run
log() { echo "[init $($B cut -d' ' -f1 /proc/uptime)] $*" > /dev/ttyS0 2>/dev/null; }
T0=$($B cut -d' ' -f1 /proc/uptime)
while read -r m; do
  [ -n "$m" ] && { $B insmod "/lib/modules/$m" || log "insmod $m failed"; }
done < /etc/modules.order
T1=$($B cut -d' ' -f1 /proc/uptime)
# free-page reporting (virtio_balloon): report free blocks from order 5
# (128 KiB) up instead of pageblock_order (2 MiB), which a fragmented small
# guest rarely has. Must be written after virtio_balloon registered: on 6.1
# registration overwrites the value given on the kernel command line.
echo 5 > /sys/module/page_reporting/parameters/page_reporting_order 2>/dev/null
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt || log "9p mount failed"
PORT=
i=0
while [ $i -lt 200 ]; do
  for d in /sys/class/virtio-ports/*; do
    [ "$($B cat $d/name 2>/dev/null)" = agent ] && PORT=/dev/${d##*/}
  done
  [ -n "$PORT" ] && [ -c "$PORT" ] && break
  $B usleep 10000; i=$((i+1))
done
log "port=$PORT modules=$T0..$T1"
exec 3<>"$PORT"
echo "READY $($B uname -r)" >&3
while true; do
  if read -r line <&3; then
    case "$line" in
      RUN\ *) $B sh -c "${line#RUN }" >&3 2>&1; echo "END rc=$?" >&3 ;;
      POWEROFF) echo "BYE" >&3; $B sync; $B poweroff -f ;;
      *) echo "echo: $line" >&3 ;;
    esac
  else
    $B usleep 50000
  fi
done
