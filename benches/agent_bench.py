#!/usr/bin/env python3
"""Replication speed of two twinsite agents on loopback, with cp and rsync beside it.

Usage: cargo build --release && python3 benches/agent_bench.py [target/release/twinsite] [GiB]

Measures, on one disk of GiB (default 4) filled with random data:
  - initial replication (enable + first acknowledged point) vs `cp` of the same file;
  - a steady-state cycle after 1% of the 64 KiB blocks changed vs
    `rsync --inplace --no-whole-file` of the same disk pair; bytes sent vs bytes changed.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/twinsite"
GIB = int(sys.argv[2]) if len(sys.argv) > 2 else 4
SIZE = GIB << 30
BLOCK = 64 << 10
TOKEN = "bench-token"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def call(url, method="GET", body=None, raw=None, timeout=3600):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", "Bearer " + TOKEN)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = r.read()
    return json.loads(out) if out else None


def start(root, site):
    d = os.path.join(root, site)
    os.makedirs(d)
    tok = os.path.join(root, site + ".token")
    with open(tok, "w") as f:
        f.write(TOKEN)
    port = free_port()
    p = subprocess.Popen([BIN, "agent", "--site", site, "--listen", f"127.0.0.1:{port}",
                          "--data-dir", d, "--token-file", tok, "--max-disk-bytes", str(SIZE)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return p, url, d
        except Exception:
            time.sleep(0.05)
    raise SystemExit("agent did not start")


def main():
    root = tempfile.mkdtemp(prefix="twinsite-bench-")
    procs = []
    try:
        pa, ua, da = start(root, "a")
        pb, ub, db = start(root, "b")
        procs += [pa, pb]
        call(ua + "/v1/vms/bench", "PUT",
             {"disks": [{"name": "disk0", "sizeBytes": SIZE}], "power": "Running",
              "integrationServices": True})
        img_a = os.path.join(da, "vms", "bench", "disks", "disk0.img")
        # Fill the disk with random data (written to the file directly: setup, not measured).
        chunk = os.urandom(64 << 20)
        with open(img_a, "r+b") as f:
            for i in range(SIZE // len(chunk)):
                f.write(bytes([i & 0xff]) + chunk[1:])
            f.flush()
            os.fsync(f.fileno())

        t = time.monotonic()
        shutil.copyfile(img_a, os.path.join(root, "cp.img"))
        cp_s = time.monotonic() - t
        os.remove(os.path.join(root, "cp.img"))

        t = time.monotonic()
        call(ua + "/v1/vms/bench/replication/enable", "POST",
             {"operationId": "en-1", "peerSite": "b", "peerUrl": ub, "peerToken": TOKEN,
              "intervalSeconds": 900, "recoveryPointRetentionHours": 24,
              "appConsistentFrequencyHours": 0, "mode": "Initial"})
        call(ua + "/v1/vms/bench/replication/sync", "POST", {"operationId": "s-1"})
        init_s = time.monotonic() - t

        # 1% of the blocks change through guest writes.
        nblocks = SIZE // BLOCK
        changed = random.sample(range(nblocks), nblocks // 100)
        for b in changed:
            call(f"{ua}/v1/vms/bench/disks/disk0/data?offset={b * BLOCK}", "PUT",
                 raw=os.urandom(BLOCK))
        img_b = os.path.join(db, "vms", "bench", "disks", "disk0.img")
        pair = os.path.join(root, "rsync-dst.img")
        shutil.copyfile(img_b, pair)
        # Warm page cache for rsync's reads, as for the agent's.
        subprocess.run(["cat", img_a, pair], stdout=subprocess.DEVNULL, check=True)
        t = time.monotonic()
        subprocess.run(["rsync", "--inplace", "--no-whole-file", img_a, pair], check=True)
        rsync_s = time.monotonic() - t
        os.remove(pair)

        before = call(ua + "/v1/vms/bench")["replication"]["bytesSent"]
        t = time.monotonic()
        call(ua + "/v1/vms/bench/replication/sync", "POST", {"operationId": "s-2"})
        cycle_s = time.monotonic() - t
        sent = call(ua + "/v1/vms/bench")["replication"]["bytesSent"] - before
        da_ = call(ua + "/v1/vms/bench/disks/disk0/digest")["sha256"]
        db_ = call(ub + "/v1/vms/bench/disks/disk0/digest")["sha256"]
        changed_bytes = len(changed) * BLOCK
        print(f"disk {GIB} GiB, {len(changed)} changed blocks ({changed_bytes} bytes)")
        print(f"initial replication: {init_s:.2f} s   cp: {cp_s:.2f} s   "
              f"speed ratio (cp time / ours): {cp_s / init_s:.2f}")
        print(f"steady-state cycle: {cycle_s:.3f} s   rsync: {rsync_s:.2f} s   "
              f"speedup: {rsync_s / cycle_s:.1f}x")
        print(f"cycle bytes sent: {sent}   changed: {changed_bytes}   "
              f"overhead: {100.0 * (sent - changed_bytes) / changed_bytes:.2f}%")
        print(f"digests equal after cycle: {da_ == db_}")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
