#!/usr/bin/env python3
"""Per-registration latency over HTTP, one at a time vs in bursts.

Against a running proxy whose API is on API_HOST:API_PORT (default
127.0.0.1:18081), without a token, with `rate_limit_per_sec` and
`rate_limit_burst` raised (100000) so that a burst from one address is not
throttled. The README's figures: a routing.db of 20,000 rows, one shard,
release build; registrations go to app "lat" (127.0.0.1:9101).
usage: api_latency.py MODE N   MODE: seq (N registrations back to back, one client)
                                     burst (N registrations fired at once, one thread+connection each)
                                     getseq (N GETs of one id back to back)"""
import http.client, json, sys, threading, time
import os
API = (os.environ.get("API_HOST", "127.0.0.1"), int(os.environ.get("API_PORT", "18081")))
mode, n = sys.argv[1], int(sys.argv[2])
RUN = format(int(time.time() * 10) % 1000000, "x")
def reg(i):
    c = http.client.HTTPConnection(*API, timeout=60)
    body = json.dumps({"id": f"l{RUN}-{i}", "app": "lat", "region": "sa", "ip": "127.0.0.1", "port": 9101})
    t = time.perf_counter()
    c.request("POST", "/api/v1/register", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse(); r.read(); dt = time.perf_counter() - t; c.close()
    assert r.status == 201, r.status
    return dt
def get(i):
    c = http.client.HTTPConnection(*API, timeout=60)
    t = time.perf_counter(); c.request("GET", "/api/v1/backends/bulk-1"); r = c.getresponse(); r.read()
    dt = time.perf_counter() - t; c.close(); assert r.status == 200; return dt
lat = []
t0 = time.perf_counter()
if mode in ("seq", "getseq"):
    f = reg if mode == "seq" else get
    for i in range(n): lat.append(f(i))
else:
    gate = threading.Barrier(n); lock = threading.Lock()
    def one(i):
        gate.wait(); dt = reg(i)
        with lock: lat.append(dt)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts: t.start()
    for t in ts: t.join()
wall = time.perf_counter() - t0
lat.sort(); p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000
print(f"{mode} n={n}: p50={p(.5):.1f} ms p99={p(.99):.1f} ms max={lat[-1]*1000:.1f} ms; wall {wall:.2f} s ({wall/n*1000:.1f} ms per request)")
