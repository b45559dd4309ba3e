#!/usr/bin/env bash
# Builds the microVM guest image from Debian packages reachable through apt.
#
#   [KUASAR_AGENT_BIN=/path/to/static/agent] hack/build-guest-image.sh OUTDIR
#
# Outputs in OUTDIR:
#   vmlinux          Debian's generic kernel (the linux-image-*-amd64 package
#                    that linux-image-amd64 depends on), taken uncompressed
#                    out of the xz bzImage so that qemu boots it through the
#                    PVH entry point (-kernel vmlinux). Its PT_LOAD segments
#                    are trimmed of their trailing zero bytes (.bss, .brk,
#                    .init.scratch are zeros in the file; qemu zero-fills
#                    p_memsz beyond p_filesz) and the section headers are
#                    dropped: 65.9 MB -> ~42 MB, and ~24 MB less of the file
#                    is mapped into every qemu. strip/objcopy do not help
#                    (the image has no symbols; they leave the segments as
#                    they are). The PVH ELF note is checked after trimming.
#   initramfs.cpio   uncompressed newc archive:
#                      /init                the agent (KUASAR_AGENT_BIN, static)
#                      /lib/modules/N.ko    only the modules the guest loads,
#                                           decompressed (finit_module-ready)
#                      /etc/modules.order   their file names, in load order
#                      /usr/bin/crun        the guest's OCI runtime (the host's
#                                           crun, or KUASAR_GUEST_RUNTIME) + the libraries
#                                           ldd names, at the same paths
#                      /proc /sys /dev /tmp /run /mnt /etc, /dev/console
#                    No busybox: the agent is PID 1, loads the modules itself
#                    and switch_roots into a tmpfs.
#   kernel.release   the guest kernel's `uname -r`
#   cmdline          the kernel command line to boot with (the sandboxer
#                    reads it beside vmlinux); the launcher must
#                    append tsc_early_khz=<host cpu MHz * 1000> at run time
#                    (see hack/guest/README.md)
#
# hack/guest/README.md has the tested qemu command line, what the agent must
# do at start-up, and the boot-time and memory measurements.
#
# Cached: OUTDIR/.stamp records the inputs (kernel package and version, runc
# and its libraries, the agent, this script, the module list); when they
# are unchanged the script exits at once. The extracted kernel and modules
# are cached separately (OUTDIR/.kernel) so a new agent does not download
# the kernel again. The kernel package is downloaded with `apt-get download`
# into a temporary folder and unpacked with dpkg-deb -x; it is never
# installed on the host.
#
# Environment:
#   KUASAR_AGENT_BIN        the static agent binary for /init (default: the
#                           workspace's kuasar-agent, built here static)
#   KUASAR_GUEST_TEST_INIT=1  use hack/guest/test-init.sh plus a static
#                           /bin/busybox as /init instead (measurements only)
#   KUASAR_GUEST_KERNEL_PKG a linux-image-*-amd64 package to use instead
#   KUASAR_GUEST_MODULES    space-separated module names (dependencies are
#                           added); default below
#   KUASAR_GUEST_RUNTIME    the OCI runtime for the guest, installed at the
#                           same path: /usr/bin/crun (default) or
#                           /usr/sbin/runc. Both take runc's command line;
#                           under TCG crun creates a container in ~0.6 s
#                           where runc's Go runtime takes ~3.5 s.
#
# Needs: apt-get, dpkg-deb, python3, cpio, ldd, sha256sum.
set -euo pipefail
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename -- "${BASH_SOURCE[0]}")
usage() { echo "usage: [KUASAR_AGENT_BIN=AGENT] $0 OUTDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
OUT=$1
T0=$(date +%s%N)
say() { echo "build-guest-image: $*"; }
die() { echo "build-guest-image: $*" >&2; exit 1; }

# virtio_balloon: free-page reporting gives freed guest RAM back to the host.
MODULES=${KUASAR_GUEST_MODULES:-virtio_ring virtio virtio_mmio virtio_console virtio_balloon 9pnet netfs fscache 9p 9pnet_virtio overlay}
RUNC=${KUASAR_GUEST_RUNTIME:-/usr/bin/crun}
CMDLINE='console=ttyS0 quiet loglevel=0 panic=-1 tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd noreplace-smp cryptomgr.notests random.trust_cpu=on'

if [ "${KUASAR_GUEST_TEST_INIT:-}" = 1 ]; then
  INIT=$HERE/guest/test-init.sh
  BUSYBOX=${KUASAR_BUSYBOX_BIN:-/bin/busybox}
  [ -x "$BUSYBOX" ] || die "$BUSYBOX missing: apt-get install busybox-static"
  ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked; install busybox-static"
else
  INIT=${KUASAR_AGENT_BIN:-}
  if [ -z "$INIT" ]; then
    # The workspace's agent, static: with --target the flags reach neither
    # build scripts nor the rest of target/.
    host=$(rustc -vV | sed -n 's/^host: //p')
    (cd "$HERE/.." && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
      cargo build --quiet --release -p kuasar-agent --target "$host")
    INIT=$HERE/../target/$host/release/kuasar-agent
  fi
  BUSYBOX=
  [ -f "$INIT" ] || die "agent $INIT: no such file"
  # ldd calls a static-pie binary "statically linked" and succeeds: ask
  # for the interpreter instead.
  if readelf -l "$INIT" | grep -q 'program interpreter'; then die "$INIT is dynamically linked; the agent must be static"; fi
fi
[ -x "$RUNC" ] || die "$RUNC missing: apt-get install $(basename "$RUNC")"
for t in apt-get dpkg-deb python3 cpio ldd sha256sum; do
  command -v "$t" >/dev/null || die "$t missing"
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# ---- the kernel package (resolution cached per apt lists state) ----------
lists_fp=$(stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* 2>/dev/null | sha256sum | cut -c1-32)
KPKG=${KUASAR_GUEST_KERNEL_PKG:-}
resolve_cache=$OUT/.kernel-pkg
if [ -f "$resolve_cache" ] && [ "$(sed -n 1p "$resolve_cache")" = "$lists_fp ${KPKG:-default}" ]; then
  read -r KPKG KVER < <(sed -n 2p "$resolve_cache")
else
  if [ -z "$KPKG" ]; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null \
      | awk '$1=="Depends:" && $2 ~ /^linux-image-.*-amd64$/ {print $2; exit}')
    [ -n "$KPKG" ] || die "cannot resolve the package linux-image-amd64 depends on (apt-get update?)"
  fi
  KVER=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
  [ -n "$KVER" ] || die "no version of $KPKG in the apt lists (apt-get update?)"
  printf '%s\n%s %s\n' "$lists_fp ${KUASAR_GUEST_KERNEL_PKG:-default}" "$KPKG" "$KVER" > "$resolve_cache"
fi

# ---- the stamp of every input --------------------------------------------
h() { sha256sum "$1" | cut -c1-64; }
runc_libs=$(ldd "$RUNC" | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
{
  echo "script $(h "$SELF")"
  echo "kernel $KPKG $KVER"
  echo "modules $MODULES"
  echo "init $INIT $(h "$INIT")"
  [ -z "$BUSYBOX" ] || echo "busybox $(h "$BUSYBOX")"
  echo "runc $RUNC $(h "$RUNC")"
  for l in $runc_libs; do echo "lib $l $(h "$(readlink -f "$l")")"; done
  echo "cmdline $CMDLINE"
} > "$OUT/.stamp.new"
kstamp="$KPKG $KVER $(h "$SELF") $MODULES"
if [ -f "$OUT/.stamp" ] && cmp -s "$OUT/.stamp" "$OUT/.stamp.new" \
   && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio" ] && [ -f "$OUT/kernel.release" ] && [ -f "$OUT/cmdline" ]; then
  rm -f "$OUT/.stamp.new"
  say "up to date in $OUT (kernel $KPKG $KVER, $(cat "$OUT/kernel.release")) [$(( ($(date +%s%N) - T0) / 1000000 )) ms]"
  exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/guest-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"   # apt-get download drops privileges to _apt when it can
umask 022

# python helpers: vmlinux extraction/trim, module dependency order
cat > "$WORK/helper.py" <<'PY'
import lzma, os, struct, subprocess, sys, gzip

def elf_sections(data):
    (shoff,) = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3a)
    secs = []
    for i in range(shnum):
        secs.append(struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize))
    stroff = secs[shstrndx][4]
    out = {}
    for s in secs:
        name = data[stroff + s[0]:data.index(b'\0', stroff + s[0])].decode()
        out[name] = s
    return out

def pvh_note(data):
    (phoff,) = struct.unpack_from('<Q', data, 0x20)
    phentsize, phnum = struct.unpack_from('<HH', data, 0x36)
    for i in range(phnum):
        p_type, _, off, _, _, filesz, _, _ = struct.unpack_from('<IIQQQQQQ', data, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from('<III', data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b'\0')
            desc = pos + 12 + ((namesz + 3) & ~3)
            if name == b'Xen' and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return struct.unpack_from('<I', data, desc)[0]
            pos = desc + ((descsz + 3) & ~3)
    return None

def vmlinux(bzimage, out):
    d = open(bzimage, 'rb').read()
    i = d.find(b'\xfd7zXZ\x00')
    if i < 0:
        sys.exit('no xz stream in ' + bzimage)
    raw = bytearray(lzma.LZMADecompressor().decompress(d[i:]))
    if raw[:4] != b'\x7fELF' or raw[4] != 2:
        sys.exit('the xz payload is not an ELF64 vmlinux')
    entry = pvh_note(raw)
    if entry is None:
        sys.exit('vmlinux has no PVH (Xen PHYS32_ENTRY) note: qemu cannot boot it directly')
    before = len(raw)
    (phoff,) = struct.unpack_from('<Q', raw, 0x20)
    phentsize, phnum = struct.unpack_from('<HH', raw, 0x36)
    end = 0x40
    for k in range(phnum):
        at = phoff + k * phentsize
        p_type, flags, off, va, pa, filesz, memsz, align = struct.unpack_from('<IIQQQQQQ', raw, at)
        if p_type == 1:  # PT_LOAD: drop trailing zeros, qemu zero-fills to p_memsz
            filesz = len(bytes(raw[off:off + filesz]).rstrip(b'\0'))
            struct.pack_into('<IIQQQQQQ', raw, at, p_type, flags, off, va, pa, filesz, memsz, align)
        end = max(end, off + filesz, at + phentsize)
    struct.pack_into('<Q', raw, 0x28, 0)            # e_shoff
    struct.pack_into('<HHH', raw, 0x3a, 0, 0, 0)    # e_shentsize, e_shnum, e_shstrndx
    del raw[end:]
    if pvh_note(raw) != entry:
        sys.exit('the PVH note did not survive trimming')
    open(out, 'wb').write(raw)
    print('vmlinux: %.1f MB -> %.1f MB, PVH entry 0x%x' % (before / 1e6, len(raw) / 1e6, entry))

def read_module(path):
    if path.endswith('.xz'):
        return lzma.decompress(open(path, 'rb').read())
    if path.endswith('.gz'):
        return gzip.decompress(open(path, 'rb').read())
    if path.endswith('.zst'):
        return subprocess.run(['zstd', '-dc', path], check=True, stdout=subprocess.PIPE).stdout
    return open(path, 'rb').read()

def modinfo(data):
    s = elf_sections(data)['.modinfo']
    info = {}
    for kv in data[s[4]:s[4] + s[5]].split(b'\0'):
        if b'=' in kv:
            k, v = kv.decode().split('=', 1)
            info.setdefault(k, v)
    return info

def modules(moddir, outdir, order_file, names):
    index = {}
    for root, _, files in os.walk(moddir):
        for f in files:
            base = f.split('.ko')[0]
            if '.ko' in f:
                index[base.replace('-', '_')] = os.path.join(root, f)
    order, seen = [], set()
    def visit(name, chain):
        name = name.replace('-', '_')
        if name in seen:
            return
        if name in chain:
            sys.exit('module dependency cycle: ' + ' -> '.join(chain + [name]))
        if name not in index:
            sys.exit('module %s not in %s (built in?)' % (name, moddir))
        data = read_module(index[name])
        deps = [x for x in modinfo(data).get('depends', '').split(',') if x]
        for dep in deps:
            visit(dep, chain + [name])
        seen.add(name)
        open(os.path.join(outdir, name + '.ko'), 'wb').write(data)
        order.append((name, deps, len(data)))
    for n in names:
        visit(n, [])
    with open(order_file, 'w') as f:
        for name, _, _ in order:
            f.write(name + '.ko\n')
    for name, deps, size in order:
        print('  %-36s %7d B  depends: %s' % (name + '.ko', size, ','.join(deps) or '-'))

if __name__ == '__main__':
    cmd = sys.argv[1]
    if cmd == 'vmlinux':
        vmlinux(sys.argv[2], sys.argv[3])
    elif cmd == 'modules':
        modules(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
PY

# ---- kernel stage: vmlinux, modules, kernel.release (cached) -------------
KC=$OUT/.kernel
if [ -f "$KC/stamp" ] && [ "$(cat "$KC/stamp")" = "$kstamp" ]; then
  say "kernel $KPKG $KVER: cached"
else
  say "kernel $KPKG $KVER: downloading"
  rm -rf "$KC" && mkdir -p "$KC/modules" "$WORK/deb" "$WORK/kx"
  chmod 0777 "$WORK/deb"
  (cd "$WORK/deb" && apt-get download -q "$KPKG=$KVER" >/dev/null) || die "apt-get download $KPKG=$KVER failed"
  dpkg-deb -x "$WORK"/deb/*.deb "$WORK/kx"
  vmlinuz=$(ls "$WORK"/kx/boot/vmlinuz-*)
  krel=${vmlinuz##*/vmlinuz-}
  [ -d "$WORK/kx/lib/modules/$krel" ] || die "no lib/modules/$krel in $KPKG"
  python3 "$WORK/helper.py" vmlinux "$vmlinuz" "$KC/vmlinux"
  say "modules (dependencies from .modinfo depends=, in load order):"
  # shellcheck disable=SC2086
  python3 "$WORK/helper.py" modules "$WORK/kx/lib/modules/$krel" "$KC/modules" "$KC/modules.order" $MODULES
  echo "$krel" > "$KC/kernel.release"
  echo "$kstamp" > "$KC/stamp"
  rm -rf "$WORK/deb" "$WORK/kx"
fi
KREL=$(cat "$KC/kernel.release")

# ---- the initramfs -------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{proc,sys,dev,tmp,run,mnt,etc,lib/modules,usr/sbin}
chmod 1777 "$R/tmp"
mknod -m 0600 "$R/dev/console" c 5 1
install -m 0755 "$INIT" "$R/init"
if [ -n "$BUSYBOX" ]; then
  mkdir -p "$R/bin" && install -m 0755 "$BUSYBOX" "$R/bin/busybox"
fi
cp "$KC"/modules/*.ko "$R/lib/modules/"
chmod 0644 "$R"/lib/modules/*.ko
cp "$KC/modules.order" "$R/etc/modules.order"
install -D -m 0755 "$RUNC" "$R$RUNC"
for l in $runc_libs; do
  mkdir -p "$R/$(dirname "$l")"
  cp -L "$l" "$R/$l"
done
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet > "$WORK/initramfs.cpio")

cp "$KC/vmlinux" "$WORK/vmlinux"
cp "$KC/kernel.release" "$WORK/kernel.release"
echo "$CMDLINE" > "$WORK/cmdline"
for f in vmlinux initramfs.cpio kernel.release cmdline; do mv -f "$WORK/$f" "$OUT/$f"; done
mv -f "$OUT/.stamp.new" "$OUT/.stamp"
say "built $OUT: vmlinux $(( $(stat -c %s "$OUT/vmlinux") / 1000000 )) MB, initramfs.cpio $(( $(stat -c %s "$OUT/initramfs.cpio") / 1000000 )) MB ($(wc -l < "$KC/modules.order") modules, $(basename "$RUNC") + $(echo "$runc_libs" | wc -w) libraries, /init=$INIT), kernel $KREL [$(( ($(date +%s%N) - T0) / 1000000 )) ms]"
