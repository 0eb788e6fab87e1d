#!/usr/bin/env python3
"""(Setup as in api_latency.py; LOG is the proxy's log, whose "routing table
reloaded" lines are counted. The GETs read bulk-1..bulk-G, rows that must
exist.)
A burst of N registrations with G GETs (of existing, untouched ids) fired at the same moment.
Counts the routing reloads it cost (from the proxy's log). usage: api_mixed.py N G LOG"""
import http.client, json, sys, threading, time
import os
API = (os.environ.get("API_HOST", "127.0.0.1"), int(os.environ.get("API_PORT", "18081")))
n, g, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
RUN = format(int(time.time() * 10) % 1000000, "x")
reloads = lambda: open(log).read().count("routing table reloaded")
lat = {"REG": [], "GET": []}; lock = threading.Lock(); gate = threading.Barrier(n + g)
def one(kind, i):
    c = http.client.HTTPConnection(*API, timeout=60); gate.wait(); t = time.perf_counter()
    if kind == "REG":
        c.request("POST", "/api/v1/register", body=json.dumps({"id": f"m{RUN}-{i}", "app": "mix", "region": "sa", "ip": "127.0.0.1", "port": 9101}), headers={"Content-Type": "application/json"})
    else:
        c.request("GET", f"/api/v1/backends/bulk-{i+1}")
    r = c.getresponse(); r.read(); dt = time.perf_counter() - t; c.close()
    assert r.status == (201 if kind == "REG" else 200), r.status
    with lock: lat[kind].append(dt)
# interleave: GETs spread among the registrations
kinds = ["REG"] * n
for j in range(g): kinds.insert((j + 1) * len(kinds) // (g + 1), "GET")
ts = []; ri = gi = 0
for k in kinds:
    ts.append(threading.Thread(target=one, args=(k, ri if k == "REG" else gi)))
    if k == "REG": ri += 1
    else: gi += 1
r0 = reloads(); t0 = time.perf_counter()
for t in ts: t.start()
for t in ts: t.join()
wall = time.perf_counter() - t0; time.sleep(0.3)
p = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(len(xs) * q))] * 1000
out = f"{n} registrations + {g} GETs at once: wall {wall:.2f} s, routing reloads {reloads() - r0}; REG p50={p(lat['REG'], .5):.0f} ms p99={p(lat['REG'], .99):.0f} ms"
if g: out += f"; GET p50={p(lat['GET'], .5):.0f} ms p99={p(lat['GET'], .99):.0f} ms"
print(out)
