#!/usr/bin/env python3
"""NIXL's own READ bandwidth between two processes on this host (UCX backend, DRAM to DRAM),
for the same sizes as turbine-transfer's `bandwidth` example. UCX picks its transports from
UCX_TLS: unset it uses shared memory on one host; UCX_TLS=tcp forces TCP.

  python3 scripts/nixl-bandwidth.py [--iters N]
Needs `pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1` and numpy (scripts/bench-nixl
sets that up in a venv).
"""
import base64
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from nixl._api import nixl_agent, nixl_agent_config

MAX = 64 << 20
SIZES_MIB = [1, 4, 16, 64]


def agent(name):
    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def target():
    a = agent("target")
    buf = np.arange(MAX, dtype=np.uint64).astype(np.uint8)
    a.register_memory([(buf.ctypes.data, MAX, 0, "")], "DRAM")
    print(json.dumps({"meta": base64.b64encode(a.get_agent_metadata()).decode(),
                      "addr": buf.ctypes.data}), flush=True)
    sys.stdin.read()


def initiator(iters):
    child = subprocess.Popen([sys.executable, __file__, "--target"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    # NIXL logs to stdout too: the metadata is the line that is a JSON object.
    line = child.stdout.readline()
    while line and not line.startswith("{"):
        line = child.stdout.readline()
    info = json.loads(line)
    a = agent("initiator")
    buf = np.zeros(MAX, dtype=np.uint8)
    a.register_memory([(buf.ctypes.data, MAX, 0, "")], "DRAM")
    name = a.add_remote_agent(base64.b64decode(info["meta"]))
    # The first transfer to a peer makes the connection; keep it out of the figures.
    warm = None
    rows = []
    for mib in SIZES_MIB:
        n = mib << 20
        local = a.get_xfer_descs([(buf.ctypes.data, n, 0)], "DRAM")
        remote = a.get_xfer_descs([(info["addr"], n, 0)], "DRAM")
        rates = []
        for i in range(iters + (1 if warm is None else 0)):
            t = time.perf_counter()
            h = a.initialize_xfer("READ", local, remote, name, b"")
            state = a.transfer(h)
            while state not in ("DONE", "ERR"):
                state = a.check_xfer_state(h)
            elapsed = time.perf_counter() - t
            a.release_xfer_handle(h)
            if state == "ERR":
                raise SystemExit(f"NIXL READ of {mib} MiB failed")
            if warm is None:
                warm = elapsed
                continue
            rates.append(n / elapsed / 1e9)
        if not np.array_equal(buf[:n], np.arange(n, dtype=np.uint64).astype(np.uint8)):
            raise SystemExit(f"NIXL READ of {mib} MiB arrived changed")
        rows.append((mib, statistics.median(rates)))
    child.stdin.close()
    child.wait()
    for mib, rate in rows:
        print(f"| {mib} MiB | {rate:.2f} |")


if __name__ == "__main__":
    if "--target" in sys.argv:
        target()
    else:
        iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 7
        initiator(iters)
