#!/usr/bin/env python3
"""Replication speed and memory of two twinsite agents on loopback, with cp and rsync beside it.

Usage: cargo build --release && python3 benches/agent_bench.py [target/release/twinsite] [GiB]
       python3 benches/agent_bench.py target/release/twinsite --memory 100

Measures, on one disk of GiB (default 4) filled with random data:
  - initial replication (enable + first acknowledged point) vs `cp` of the same file;
  - a steady-state cycle after 1% of the 64 KiB blocks changed vs
    `rsync --inplace --no-whole-file --ignore-times` of the same disk pair; bytes sent vs bytes
    changed;
  - reverse resync after a failover with writes at both sides (0.5% of the blocks each, 1% in
    all) vs the same rsync of the same disk pair.

With --latency: guest write latency (4 KiB writes, p50 and p99) on a small VM while another VM
of the same agent runs a whole-disk digest of GiB, beside the same writes with the agent idle.

With --memory N: N protected VMs of 1 GiB each (sparse, a few MiB written to each), initial
replication of all, then rounds of writes and cycles; reports the peak resident memory
(VmHWM) and the last VmRSS of both agents from /proc; then one cycle of 256 MiB of one VM and
the peak again.
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

ARGS = [a for a in sys.argv[1:]]
MEMORY_VMS = None
LATENCY = "--latency" in ARGS
if LATENCY:
    ARGS.remove("--latency")
if "--memory" in ARGS:
    i = ARGS.index("--memory")
    MEMORY_VMS = int(ARGS[i + 1])
    del ARGS[i:i + 2]
BIN = ARGS[0] if len(ARGS) > 0 else "target/release/twinsite"
GIB = int(ARGS[1]) if len(ARGS) > 1 else (1 if MEMORY_VMS else 4)
SIZE = GIB << 30
BLOCK = 64 << 10
TOKEN = "bench-token"
# --ignore-times: rsync's quick check (same size and modification time) must not skip the file;
# on a small disk the copy can share the second of the last write.
RSYNC = ["rsync", "--inplace", "--no-whole-file", "--ignore-times"]


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
                          "--data-dir", d, "--token-file", tok, "--max-disk-bytes", str(SIZE),
                          "--insecure-http"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return p, url, d
        except Exception:
            time.sleep(0.05)
    raise SystemExit("agent did not start")


def mem_of(p):
    """(VmHWM, VmRSS) of a process in KiB."""
    out = {}
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0])
    return out.get("VmHWM", 0), out.get("VmRSS", 0)


def memory(n):
    """N protected VMs of 1 GiB: resident memory of both agents while cycles run."""
    import concurrent.futures as cf
    root = tempfile.mkdtemp(prefix="twinsite-bench-")
    procs = []
    try:
        pa, ua, da = start(root, "a")
        pb, ub, db = start(root, "b")
        procs += [pa, pb]
        names = [f"vm-{i:03d}" for i in range(n)]
        nblocks = SIZE // BLOCK

        def scribble(vm, count):
            for b in random.sample(range(nblocks), count):
                call(f"{ua}/v1/vms/{vm}/disks/disk0/data?offset={b * BLOCK}", "PUT",
                     raw=os.urandom(BLOCK))

        peak = {"a": 0, "b": 0}

        def sample():
            for k, p in (("a", pa), ("b", pb)):
                peak[k] = max(peak[k], mem_of(p)[1])

        for vm in names:
            call(f"{ua}/v1/vms/{vm}", "PUT",
                 {"disks": [{"name": "disk0", "sizeBytes": SIZE}], "power": "Running",
                  "integrationServices": True})
            scribble(vm, 64)  # 4 MiB per VM
        t = time.monotonic()
        for vm in names:
            call(f"{ua}/v1/vms/{vm}/replication/enable", "POST",
                 {"operationId": "en-" + vm, "peerSite": "b", "peerUrl": ub, "peerToken": TOKEN,
                  "intervalSeconds": 30, "recoveryPointRetentionHours": 24,
                  "appConsistentFrequencyHours": 0, "mode": "Initial"})
        with cf.ThreadPoolExecutor(16) as ex:
            futs = [ex.submit(call, f"{ua}/v1/vms/{vm}/replication/sync", "POST",
                              {"operationId": "s0-" + vm}) for vm in names]
            while not all(f.done() for f in futs):
                sample()
                time.sleep(0.2)
            for f in futs:
                f.result()
        init_s = time.monotonic() - t
        rounds = 3
        t = time.monotonic()
        for r in range(rounds):
            with cf.ThreadPoolExecutor(16) as ex:
                list(ex.map(lambda vm: scribble(vm, 8), names))
            sample()
            with cf.ThreadPoolExecutor(16) as ex:
                futs = [ex.submit(call, f"{ua}/v1/vms/{vm}/replication/sync", "POST",
                                  {"operationId": f"s{r + 1}-{vm}"}) for vm in names]
                while not all(f.done() for f in futs):
                    sample()
                    time.sleep(0.2)
                for f in futs:
                    f.result()
        cycles_s = time.monotonic() - t
        # Periodic cycles (every 30 s) run on their own meanwhile: let a period pass.
        end = time.monotonic() + 35
        while time.monotonic() < end:
            scribble(random.choice(names), 1)
            sample()
            time.sleep(0.2)
        hwm_a, rss_a = mem_of(pa)
        hwm_b, rss_b = mem_of(pb)
        # One big cycle: 256 MiB written to one VM, then a sync; neither side may hold it.
        big = names[0]
        for i in range(64):
            call(f"{ua}/v1/vms/{big}/disks/disk0/data?offset={i * (4 << 20)}", "PUT",
                 raw=os.urandom(4 << 20))
        t = time.monotonic()
        call(f"{ua}/v1/vms/{big}/replication/sync", "POST", {"operationId": "big-" + big})
        big_s = time.monotonic() - t
        da_ = call(f"{ua}/v1/vms/{big}/disks/disk0/digest")["sha256"]
        db_ = call(f"{ub}/v1/vms/{big}/disks/disk0/digest")["sha256"]
        hwm_a2, _ = mem_of(pa)
        hwm_b2, _ = mem_of(pb)
        du = subprocess.run(["du", "-sk", da, db], capture_output=True, text=True).stdout
        print(f"{n} VMs of {GIB} GiB, 4 MiB written to each, then {rounds} rounds of 512 KiB "
              f"per VM with a sync of every VM, then 35 s of periodic cycles")
        print(f"initial replication of all: {init_s:.1f} s   {rounds} cycle rounds: "
              f"{cycles_s:.1f} s")
        print(f"source agent:  VmHWM {hwm_a / 1024:.1f} MiB   VmRSS {rss_a / 1024:.1f} MiB   "
              f"(highest sampled RSS {peak['a'] / 1024:.1f} MiB)")
        print(f"replica agent: VmHWM {hwm_b / 1024:.1f} MiB   VmRSS {rss_b / 1024:.1f} MiB   "
              f"(highest sampled RSS {peak['b'] / 1024:.1f} MiB)")
        print(f"then one cycle of 256 MiB of {big}: {big_s:.1f} s, digests equal: {da_ == db_}; "
              f"VmHWM after it: source {hwm_a2 / 1024:.1f} MiB, replica {hwm_b2 / 1024:.1f} MiB")
        print("space used (KiB):", " ".join(du.split()))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latency():
    """Guest write latency on one VM while another VM of the same agent is digested."""
    import threading
    root = tempfile.mkdtemp(prefix="twinsite-bench-")
    procs = []
    try:
        pa, ua, da = start(root, "a")
        procs.append(pa)
        for vm, size in (("big", SIZE), ("small", 64 << 20)):
            call(f"{ua}/v1/vms/{vm}", "PUT",
                 {"disks": [{"name": "disk0", "sizeBytes": size}], "power": "Running",
                  "integrationServices": True})
        img = os.path.join(da, "vms", "big", "disks", "disk0.img")
        chunk = os.urandom(64 << 20)
        with open(img, "r+b") as f:
            for i in range(SIZE // len(chunk)):
                f.write(bytes([i & 0xff]) + chunk[1:])
            f.flush()
            os.fsync(f.fileno())
        data = os.urandom(4096)

        def writes(n):
            out = []
            for i in range(n):
                t = time.monotonic()
                call(f"{ua}/v1/vms/small/disks/disk0/data?offset={(i % 1000) * 65536}", "PUT",
                     raw=data)
                out.append(time.monotonic() - t)
            return out

        idle = writes(300)
        done = threading.Event()
        digest_s = []

        def digest():
            t = time.monotonic()
            call(f"{ua}/v1/vms/big/disks/disk0/digest")
            digest_s.append(time.monotonic() - t)
            done.set()

        # Cold cache for the digest, as after a long run of other work.
        subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"],
                       stderr=subprocess.DEVNULL, check=False)
        th = threading.Thread(target=digest)
        th.start()
        busy = []
        while not done.is_set():
            busy += writes(20)
        th.join()
        ms = lambda x: f"{1000 * x:.1f} ms"
        print(f"digest of {GIB} GiB: {digest_s[0]:.2f} s; {len(busy)} writes during it")
        print(f"guest write 4 KiB, idle: p50 {ms(pct(idle, .5))}  p99 {ms(pct(idle, .99))}")
        print(f"guest write 4 KiB, other VM digesting: p50 {ms(pct(busy, .5))}  "
              f"p99 {ms(pct(busy, .99))}  max {ms(max(busy))}")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


def main():
    if MEMORY_VMS:
        return memory(MEMORY_VMS)
    if LATENCY:
        return latency()
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
        # The replica's copy is durable (fsync) when acknowledged; cp's only after a sync.
        fd = os.open(os.path.join(root, "cp.img"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        cp_sync_s = time.monotonic() - t
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
        subprocess.run(RSYNC + [img_a, pair], check=True)
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
              f"speed ratio (cp time / ours): {cp_s / init_s:.2f}   "
              f"cp + fsync: {cp_sync_s:.2f} s   ratio: {cp_sync_s / init_s:.2f}")
        print(f"steady-state cycle: {cycle_s:.3f} s   rsync: {rsync_s:.2f} s   "
              f"speedup: {rsync_s / cycle_s:.1f}x")
        print(f"cycle bytes sent: {sent}   changed: {changed_bytes}   "
              f"overhead: {100.0 * (sent - changed_bytes) / changed_bytes:.2f}%")
        print(f"digests equal after cycle: {da_ == db_}")

        # Reverse resync: A writes 0.5% of the blocks it never sends and shuts down, B fails
        # over to the latest point and writes another 0.5%; then B resyncs back to A.
        sample = random.sample(range(nblocks), nblocks // 100)
        a_blocks, b_blocks = sample[: len(sample) // 2], sample[len(sample) // 2:]
        for b in a_blocks:
            call(f"{ua}/v1/vms/bench/disks/disk0/data?offset={b * BLOCK}", "PUT",
                 raw=os.urandom(BLOCK))
        call(ua + "/v1/vms/bench/power", "POST", {"action": "Shutdown", "operationId": "sd-1"})
        call(ua + "/v1/vms/bench/replication/stop", "POST", {"operationId": "stop-1"})
        call(ub + "/v1/vms/bench/failover", "POST",
             {"operationId": "fo-1", "recoveryPoint": "Latest"})
        call(ub + "/v1/vms/bench/commit", "POST", {"operationId": "commit-1"})
        for b in b_blocks:
            call(f"{ub}/v1/vms/bench/disks/disk0/data?offset={b * BLOCK}", "PUT",
                 raw=os.urandom(BLOCK))
        pair = os.path.join(root, "rsync-dst.img")
        shutil.copyfile(img_a, pair)
        subprocess.run(["cat", img_b, pair], stdout=subprocess.DEVNULL, check=True)
        t = time.monotonic()
        subprocess.run(RSYNC + [img_b, pair], check=True)
        rsync_r = time.monotonic() - t
        os.remove(pair)
        subprocess.run(["cat", img_a, img_b], stdout=subprocess.DEVNULL, check=True)
        t = time.monotonic()
        call(ua + "/v1/vms/bench/replication/accept", "POST",
             {"operationId": "acc-2", "sourceSite": "b"})
        call(ub + "/v1/vms/bench/replication/enable", "POST",
             {"operationId": "en-2", "peerSite": "a", "peerUrl": ua, "peerToken": TOKEN,
              "intervalSeconds": 900, "recoveryPointRetentionHours": 24,
              "appConsistentFrequencyHours": 0, "mode": "Resync"})
        call(ub + "/v1/vms/bench/replication/sync", "POST", {"operationId": "s-r1"})
        resync_s = time.monotonic() - t
        rsent = call(ub + "/v1/vms/bench")["replication"]["bytesSent"]
        da_ = call(ua + "/v1/vms/bench/disks/disk0/digest")["sha256"]
        db_ = call(ub + "/v1/vms/bench/disks/disk0/digest")["sha256"]
        differing = len(set(sample)) * BLOCK
        print(f"reverse resync ({len(a_blocks)} blocks written at A, {len(b_blocks)} at B): "
              f"{resync_s:.3f} s   rsync: {rsync_r:.2f} s   speedup: {rsync_r / resync_s:.1f}x")
        print(f"resync bytes sent: {rsent}   differing: {differing}")
        print(f"digests equal after resync: {da_ == db_}")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
