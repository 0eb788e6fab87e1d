#!/usr/bin/env bash
# Instructions a proxy executes in user space per new connection, counted by
# valgrind's callgrind: the figure that tells whether a change to the
# connection path took work out of it, which the perf suite's CPU figures
# cannot on a shared 2-vCPU VM (README, "Instructions per new connection").
#
#   perf/count-instructions.sh [-n CONNECTIONS] BINARY...
#
# Each BINARY is an edgeproxy binary, or the perf suite's minimal-proxy (told
# apart by its file name). Each runs alone under callgrind, one shard or
# worker, in front of an nginx backend that answers `200 hi`; a Python client
# makes 300 connections to warm it up, then CONNECTIONS more (default 3000),
# one at a time (GET, response, close), with callgrind counting only those
# (`callgrind_control -i on/off`). Printed per binary: instructions per
# connection in all, in the binary itself, and in the libraries (libc's
# system-call wrappers, malloc, memcpy), all threads together.
#
# Needs valgrind, nginx, sqlite3 and python3; about 30 s per binary (valgrind
# runs a proxy some 50 times slower while counting). One listener on purpose:
# with the perf suite's three, edgeproxy took minutes to start under valgrind
# 3.19, its main thread waiting for valgrind's scheduler lock while the shard
# thread sat in io_uring_enter(2) waiting for a completion.
set -euo pipefail

connections=3000
if [[ ${1:-} == -n ]]; then
    connections=$2
    shift 2
fi
if [[ $# -eq 0 ]]; then
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
for tool in valgrind callgrind_control nginx sqlite3 python3; do
    command -v "$tool" >/dev/null || { echo "count-instructions: $tool is not installed" >&2; exit 1; }
done

work=$(mktemp -d /tmp/count-instructions.XXXXXX)
pids=()
cleanup() {
    # SIGTERM: nginx's master stops its worker then (killed, it would leave
    # the worker running); a proxy still running here is one that failed.
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The backend: nginx, one worker, on CPU 0 with the client; the proxy on CPU 1.
backend_port=$(free_port)
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    server { listen 127.0.0.1:$backend_port; location / { return 200 "hi\n"; } }
}
EOF
taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)

# The client: connects COUNT times to PORT, one connection at a time, and
# prints how many got a 200; with `probe` for COUNT, tries once and says by
# its exit status whether that got a 200.
cat >"$work/client.py" <<'EOF'
import socket, sys
port, count = int(sys.argv[1]), sys.argv[2]
req = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
def once():
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(req)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.startswith(b"HTTP/1.1 200")
if count == "probe":
    try:
        sys.exit(0 if once() else 1)
    except OSError:
        sys.exit(1)
print(sum(once() for _ in range(int(count))))
EOF
client() {
    taskset -c 0 python3 "$work/client.py" "$@"
}

# Instructions in a callgrind dump, all and by object: "total own libraries".
# A cost line is charged to its function's object (`ob=`, names compressed as
# `ob=(2) /path`, later `ob=(2)`); the line after `calls=` is that call's
# inclusive cost, already counted in the callee, and is skipped. The sum is
# checked against the `totals:` line callgrind writes.
split_dump() {
    python3 - "$@" <<'EOF'
import os, re, sys
path, own = sys.argv[1], sys.argv[2]
names, is_own, skip, declared = {}, False, False, None
total = mine = 0
for line in open(path):
    if line.startswith("ob="):
        m = re.match(r"ob=\((\d+)\)\s*(.*)", line.strip())
        name = m.group(2) or names.get(m.group(1), "")
        names.setdefault(m.group(1), name)
        is_own = os.path.basename(name) == own
    elif line.startswith("calls="):
        skip = True
    elif line.startswith("totals:"):
        declared = int(line.split()[1])
    elif re.match(r"^(\*|[+-]?\d+) \d+", line):
        if skip:
            skip = False
            continue
        ir = int(line.split()[1])
        total += ir
        mine += ir * is_own
if declared is not None and declared != total:
    sys.exit(f"count-instructions: read {total} instructions, the dump says {declared}")
print(total, mine, total - mine)
EOF
}

printf '%-40s %14s %10s %10s\n' "binary" "instr./conn." "own code" "libraries"
run=0
for binary in "$@"; do
    binary=$(readlink -f "$binary")
    name=$(basename "$binary")
    run=$((run + 1))
    port=$(free_port)
    out="$work/callgrind-$run.out"
    if [[ $name == *minimal* ]]; then
        args=(--workers 1 "127.0.0.1:$port=127.0.0.1:$backend_port")
    else
        # The original edgeProxy's table, as the perf suite writes it.
        sqlite3 "$work/routing-$run.db" "CREATE TABLE backends (id TEXT PRIMARY KEY, app TEXT,
            region TEXT, wg_ip TEXT, port INTEGER, healthy INTEGER, weight INTEGER,
            soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0);
            INSERT INTO backends VALUES ('http-0', 'http', 'sa', '127.0.0.1', $backend_port,
            1, 1, 100000, 0, 0);"
        cat >"$work/$run.toml" <<EOF
[pop]
region = "sa"
[runtime]
shards = 1
[routing]
db_path = "$work/routing-$run.db"
[demo]
backends = 0
[limits]
shutdown_grace_secs = 1
[[listener]]
name = "http"
addr = "127.0.0.1:$port"
app = "http"
EOF
        args=(--config "$work/$run.toml")
    fi
    # GLIBC_TUNABLES set: edgeproxy would otherwise re-execute itself to set
    # it (control::memcpy_tuning), which valgrind cannot follow.
    GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=0x1000000 taskset -c 1 \
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$binary" "${args[@]}" >"$work/$run.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    # Up to 10 minutes for it to answer, while it runs.
    for ((waited = 0; ; waited++)); do
        client "$port" probe && break
        if ! kill -0 "$pid" 2>/dev/null || ((waited >= 600)); then
            echo "count-instructions: $name did not answer:" >&2
            tail "$work/$run.log" >&2
            exit 1
        fi
        sleep 1
    done
    client "$port" 300 >/dev/null
    # callgrind_control says what it sends on stderr, and fails with a message
    # on stdout: both kept for a failure only.
    callgrind_control -i on "$pid" >"$work/control.log" 2>&1 || { cat "$work/control.log" >&2; exit 1; }
    served=$(client "$port" "$connections")
    callgrind_control -i off "$pid" >"$work/control.log" 2>&1 || { cat "$work/control.log" >&2; exit 1; }
    callgrind_control -d "$pid" >"$work/control.log" 2>&1 || { cat "$work/control.log" >&2; exit 1; }
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    [[ $served == "$connections" ]] || { echo "count-instructions: $name served $served of $connections" >&2; exit 1; }
    read -r total own libs < <(split_dump "$out.1" "$name")
    printf '%-40s %14d %10d %10d\n' "$binary" $((total / connections)) $((own / connections)) $((libs / connections))
done
