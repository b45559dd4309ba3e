#!/usr/bin/env python3
"""Pushes an OCI image archive (the tar hack/build-*-image.sh write) to a
registry through the registry v2 HTTP API, with the standard library only.

    registry-push.py OCI.tar HOST:PORT REPOSITORY:TAG

Every manifest of the archive's index.json is pushed (its config and layer
blobs first, each skipped when the registry already has it); the last one is
tagged TAG. The manifest bytes are pushed as they are, so the pulled image
has the digest the archive has. Plain http: meant for a registry on
127.0.0.1 only.
"""
import hashlib
import json
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request


def request(method, url, data=None, headers=None, ok=(200, 201, 202)):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        if e.code in ok:
            return e.code, e.headers, e.read()
        if method == "HEAD" and e.code == 404:
            return 404, e.headers, b""
        raise SystemExit(f"registry-push: {method} {url}: {e.code} {e.read()[:300]!r}")


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    archive, host, target = sys.argv[1:]
    repo, _, tag = target.rpartition(":")
    if not repo or "/" in tag:
        raise SystemExit(f"registry-push: give REPOSITORY:TAG, not {target}")
    base = f"http://{host}/v2/{repo}"
    with tarfile.open(archive) as tar:
        def blob(digest):
            algo, _, hexa = digest.partition(":")
            data = tar.extractfile(f"blobs/{algo}/{hexa}").read()
            if f"{algo}:" + hashlib.new(algo, data).hexdigest() != digest:
                raise SystemExit(f"registry-push: {archive}: blob {digest} is corrupt")
            return data

        def push_blob(digest):
            if request("HEAD", f"{base}/blobs/{digest}")[0] == 200:
                return
            _, headers, _ = request("POST", f"{base}/blobs/uploads/")
            location = urllib.parse.urljoin(f"http://{host}/", headers["Location"])
            sep = "&" if "?" in location else "?"
            request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", blob(digest),
                    {"Content-Type": "application/octet-stream"})

        index = json.loads(tar.extractfile("index.json").read())
        for desc in index["manifests"]:
            raw = blob(desc["digest"])
            manifest = json.loads(raw)
            for d in [manifest["config"], *manifest["layers"]]:
                push_blob(d["digest"])
            # By digest, then under the tag (the last manifest wins it).
            media = desc.get("mediaType") or manifest.get("mediaType")
            for ref in (desc["digest"], tag):
                request("PUT", f"{base}/manifests/{ref}", raw, {"Content-Type": media})
        print(f"{host}/{repo}:{tag} ({index['manifests'][-1]['digest']})")


if __name__ == "__main__":
    main()
