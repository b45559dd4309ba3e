#!/usr/bin/env python3
"""Builds a busybox OCI image archive from Debian's busybox-static, because
no image registry is reachable here. Usage: build-busybox-image.py OUT.tar [REF]

The archive imports with `ctr image import` on containerd 1.6 and 2.x under
REF (default docker.io/library/busybox:latest). Reproducible: fixed mtimes."""
import gzip, hashlib, io, json, os, sys, tarfile

BUSYBOX = "/bin/busybox"
MTIME = 1700000000


def add_file(tar, name, data, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, MTIME
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
    tar.addfile(info)


def applets():
    out = os.popen(f"{BUSYBOX} --list").read().split()
    return sorted(a for a in out if a and a != "busybox")


def layer_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            add_dir(tar, d)
        with open(BUSYBOX, "rb") as f:
            add_file(tar, "bin/busybox", f.read(), 0o755)
        for a in applets():
            info = tarfile.TarInfo(f"bin/{a}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "busybox", 0o777, MTIME
            tar.addfile(info)
        add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file(tar, "etc/group", b"root:x:0:\nnobody:x:65534:\n")
    return buf.getvalue()


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: build-busybox-image.py OUT.tar [REF]")
    out = sys.argv[1]
    ref = sys.argv[2] if len(sys.argv) > 2 else "docker.io/library/busybox:latest"
    blobs = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return f"sha256:{d}", len(data)

    raw = layer_tar()
    gz = gzip.compress(raw, mtime=0)
    layer_digest, layer_size = blob(gz)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": "kuasar hack/build-busybox-image.py"}],
    }
    config_digest, config_size = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = blob(json.dumps(manifest, sort_keys=True).encode())
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
        }],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_file(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        add_dir(tar, "blobs")
        add_dir(tar, "blobs/sha256")
        for d in sorted(blobs):
            add_file(tar, f"blobs/sha256/{d}", blobs[d])
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
