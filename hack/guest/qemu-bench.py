#!/usr/bin/env python3
"""Launches microVMs from a guest image built with
KUASAR_GUEST_TEST_INIT=1 hack/build-guest-image.sh IMAGE and measures them.

The agent channel is a virtio-serial port named `agent` whose chardev is
`-chardev socket,id=agent,fd=N`: N is one end of a connected
socket.socketpair() that qemu inherits (pass_fds); the other end stays here.

  qemu-bench.py IMAGE [--runs 5] [--vms 1] [--mem 128] [--tb-size N]
                [--memfd] [--balloon] [--max-ports N] [--cpu MODEL]
                [--vmlinux FILE] [--append ARGS] [--idle 5]
                [--check] [--show-argv] [--label TEXT]

The recommended line (hack/guest/README.md) is
  --tb-size 16 --memfd --balloon --max-ports 2

--check also runs the functional checks (echo both ways, a bind mount made
on the host inside the shared folder after qemu started is visible in the
guest, runc runs). Every qemu it starts is killed before it exits.
"""
import argparse, os, re, signal, socket, statistics, subprocess, sys, tempfile, time

def cpu_khz():
    # TCG derives the guest TSC from the host's; the guest skips its PIT
    # calibration (which can hang under load on microvm) when told the rate.
    for line in open('/proc/cpuinfo'):
        if line.startswith('cpu MHz'):
            return int(float(line.split(':')[1]) * 1000)
    raise SystemExit('no "cpu MHz" in /proc/cpuinfo')

def qemu_argv(a, image, fd, share, console):
    accel = 'tcg' + (',tb-size=%d' % a.tb_size if a.tb_size else '')
    machine = 'microvm' + (',memory-backend=mem' if a.memfd else '')
    cmdline = open(os.path.join(image, 'cmdline')).read().strip()
    cmdline += ' tsc_early_khz=%d' % cpu_khz() + (' ' + a.append if a.append else '')
    argv = ['qemu-system-x86_64', '-accel', accel, '-machine', machine,
            '-cpu', a.cpu, '-smp', '1', '-m', str(a.mem)]
    if a.memfd:
        argv += ['-object', 'memory-backend-memfd,id=mem,size=%dM,share=on' % a.mem]
    argv += ['-nodefaults', '-no-user-config', '-nographic', '-no-reboot',
             '-kernel', a.vmlinux or os.path.join(image, 'vmlinux'),
             '-initrd', os.path.join(image, 'initramfs.cpio'),
             '-append', cmdline,
             '-serial', 'file:' + console,
             '-fsdev', 'local,id=share,path=%s,security_model=none,multidevs=remap' % share,
             '-device', 'virtio-9p-device,fsdev=share,mount_tag=share',
             '-device', 'virtio-serial-device' + (',max_ports=%d' % a.max_ports if a.max_ports else ''),
             '-chardev', 'socket,id=agent,fd=%d' % fd,
             '-device', 'virtserialport,chardev=agent,name=agent']
    if a.balloon:
        argv += ['-device', 'virtio-balloon-device,free-page-reporting=on']
    return argv

class VM:
    def __init__(self, a, image, tag):
        self.dir = tempfile.mkdtemp(prefix='qb-%s-' % tag)
        self.share = os.path.join(self.dir, 'share')
        os.mkdir(self.share)
        open(os.path.join(self.share, 'hostfile.txt'), 'w').write('hello from host\n')
        self.console = os.path.join(self.dir, 'console.log')
        self.host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.argv = qemu_argv(a, image, guest.fileno(), self.share, self.console)
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(self.argv, pass_fds=[guest.fileno()],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(self.dir, 'stderr'), 'w'))
        guest.close()
        self.buf = b''
        self.cleanup_dirs = []
        self.first_byte = None
        self.ready = None

    def readline(self, timeout=60):
        end = time.monotonic() + timeout
        while b'\n' not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError('no line from the guest (console %s)' % self.console)
            self.host.settimeout(left)
            d = self.host.recv(4096)
            if not d:
                raise EOFError('agent channel closed (console %s)' % self.console)
            if self.first_byte is None:
                self.first_byte = time.monotonic() - self.t0
            self.buf += d
        line, self.buf = self.buf.split(b'\n', 1)
        return line.decode(errors='replace')

    def wait_ready(self, timeout=90):
        self.ready = self.readline(timeout)
        return self.ready

    def send(self, line):
        self.host.sendall(line.encode() + b'\n')

    def run(self, cmd, timeout=60):
        self.send('RUN ' + cmd)
        out = []
        while True:
            l = self.readline(timeout)
            if l.startswith('END rc='):
                return int(l[7:]), out
            out.append(l)

    def mem(self):
        r = {}
        for line in open('/proc/%d/smaps_rollup' % self.p.pid):
            m = re.match(r'(\w+):\s+(\d+) kB', line)
            if m:
                r[m.group(1)] = int(m.group(2))
        for line in open('/proc/%d/status' % self.p.pid):
            m = re.match(r'(RssAnon|RssFile|RssShmem|VmRSS):\s+(\d+) kB', line)
            if m:
                r[m.group(1)] = int(m.group(2))
        # the biggest mappings: guest RAM, TCG code buffer, vmlinux
        maps, cur = [], None
        for line in open('/proc/%d/smaps' % self.p.pid):
            f = line.split()
            if re.match(r'^[0-9a-f]+-[0-9a-f]+ ', line):
                lo, hi = (int(x, 16) for x in f[0].split('-'))
                cur = {'name': f[5] if len(f) > 5 else '[anon]', 'size': (hi - lo) // 1024}
                maps.append(cur)
            elif f[0] in ('Rss:', 'Pss:', 'AnonHugePages:'):
                cur[f[0][:-1]] = int(f[1])
        maps.sort(key=lambda m: -m.get('Rss', 0))
        r['top'] = maps[:4]
        return r

    def stop(self, keep=False):
        if self.p.poll() is None:
            try:
                self.send('POWEROFF')
                self.p.wait(10)
            except Exception:
                pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.host.close()
        for d in os.listdir(self.share):
            p = os.path.join(self.share, d)
            if subprocess.run(['mountpoint', '-q', p]).returncode == 0:
                subprocess.run(['umount', p], check=True)
        if not keep:
            subprocess.run(['rm', '-rf', self.dir] + self.cleanup_dirs)

def check(vm):
    vm.send('ping 123')
    assert vm.readline() == 'echo: ping 123', 'echo failed'
    rc, out = vm.run('cat /mnt/hostfile.txt; echo from-guest > /mnt/guest.txt')
    assert rc == 0 and out == ['hello from host'], out
    assert open(os.path.join(vm.share, 'guest.txt')).read() == 'from-guest\n'
    # a bind mount made on the host inside the shared folder after qemu started
    # (from another filesystem when possible: multidevs=remap keeps inode
    # numbers unique across host devices)
    src = tempfile.mkdtemp(prefix='qb-bind-', dir='/dev/shm' if os.path.isdir('/dev/shm') else vm.dir)
    vm.cleanup_dirs.append(src)
    open(os.path.join(src, 'inbind.txt'), 'w').write('via bind mount\n')
    dst = os.path.join(vm.share, 'bound')
    os.mkdir(dst)
    subprocess.run(['mount', '--bind', src, dst], check=True)
    rc, out = vm.run('cat /mnt/bound/inbind.txt; stat -c "%d:%i %n" /mnt/hostfile.txt /mnt/bound/inbind.txt /mnt/bound')
    print('  bind mount in guest (host st_dev %d vs share %d):' % (os.stat(src).st_dev, os.stat(vm.share).st_dev), rc, out)
    assert rc == 0 and out[0] == 'via bind mount', out
    rc, out = vm.run('/usr/sbin/runc --version | head -1; uname -r; free -k | head -2; '
                     'cat /sys/bus/virtio/devices/*/features >/dev/null; ls /sys/bus/virtio/drivers')
    print('  guest:', rc, out)
    assert rc == 0 and out[0].startswith('runc version')

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('image')
    ap.add_argument('--runs', type=int, default=1)
    ap.add_argument('--vms', type=int, default=1)
    ap.add_argument('--mem', type=int, default=128)
    ap.add_argument('--tb-size', type=int, default=0)
    ap.add_argument('--memfd', action='store_true')
    ap.add_argument('--balloon', action='store_true')
    ap.add_argument('--vmlinux')
    ap.add_argument('--cpu', default='qemu64,+rdrand')
    ap.add_argument('--max-ports', type=int, default=0)
    ap.add_argument('--append', default='')
    ap.add_argument('--idle', type=float, default=5)
    ap.add_argument('--check', action='store_true')
    ap.add_argument('--show-argv', action='store_true')
    ap.add_argument('--label', default='')
    a = ap.parse_args()
    boots, pss, rows = [], [], []
    vms = []
    def cleanup(*_):
        for v in vms:
            try: v.stop()
            except Exception: pass
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    try:
        for run in range(a.runs):
            vms = [VM(a, a.image, 'r%dv%d' % (run, i)) for i in range(a.vms)]
            if a.show_argv and run == 0:
                print(' '.join("'%s'" % x if ' ' in x else x for x in vms[0].argv))
            for v in vms:
                try:
                    v.wait_ready()
                except Exception as e:
                    print('  FAILED:', e, open(v.console).read()[-2000:])
                    v.stop(keep=True)
                    raise
            for v in vms:
                boots.append(v.first_byte * 1000)
            if a.check and run == 0:
                check(vms[0])
            ticks = lambda v: sum(int(x) for x in open('/proc/%d/stat' % v.p.pid).read().rsplit(')', 1)[1].split()[11:13])
            t_idle, c0 = time.monotonic(), [ticks(v) for v in vms]
            time.sleep(a.idle)
            for v, c in zip(vms, c0):
                m = v.mem()
                m['cpu'] = (ticks(v) - c) / os.sysconf('SC_CLK_TCK') / (time.monotonic() - t_idle) * 100
                rows.append(m)
                pss.append(m['Pss'])
            if run == 0:
                print('  ready:', vms[0].ready)
                for mm in rows[0]['top']:
                    print('   map %-40s size %8d kB Rss %7d Pss %7d THP %d' % (mm['name'][-40:], mm['size'], mm.get('Rss', 0), mm.get('Pss', 0), mm.get('AnonHugePages', 0)))
            for v in vms:
                v.stop()
            vms = []
    finally:
        cleanup()
    med = lambda k: statistics.median(r[k] for r in rows) / 1024
    print('RESULT %-40s vms=%d runs=%d boot_ms median %d (min %d max %d) | idle cpu %.1f%% | PSS %.1f MB (anon %.1f file %.1f shmem %.1f) | RSS %.1f (anon %.1f file %.1f shmem %.1f)' % (
        a.label, a.vms, a.runs, statistics.median(boots), min(boots), max(boots), med('cpu') * 1024,
        med('Pss'), med('Pss_Anon'), med('Pss_File'), med('Pss_Shmem'),
        med('VmRSS'), med('RssAnon'), med('RssFile'), med('RssShmem')))

if __name__ == '__main__':
    main()
