#!/usr/bin/env bash
# Validates metrics and `gpuwatch top` against two real PyTorch processes (GPU machine, root, bcc and
# urwid importable). Writes a top screen capture, a metrics excerpt and NVML's view to $OUT.
#   source .bcc/env.sh && source bench/gw-env.sh && bash bench/validate_exporters.sh
set -euo pipefail
OUT=${OUT:-/tmp}
install -d -m 0755 /tmp/gw-exporters  # the daemon refuses a socket directory others can write
sock=/tmp/gw-exporters/gw.sock
python3 -P -m gpuwatch.client.cli --socket $sock run --launches all --listen 127.0.0.1:9445 >"$OUT/daemon.log" 2>&1 &
daemon=$!
until python3 -P -m gpuwatch.client.cli --socket $sock status >/dev/null 2>&1; do sleep 0.2; done
worker() {  # GiB to hold, seconds to run
  python3 - "$1" "$2" <<'PY'
import sys, time, torch
held = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
x = torch.zeros(1, device="cuda")
end = time.time() + float(sys.argv[2])
while time.time() < end:
    for _ in range(1000):
        x.add_(1)
    torch.cuda.synchronize()
print("reserved", torch.cuda.memory_reserved(), flush=True)
PY
}
worker 2 25 >"$OUT/worker_small.txt" & small=$!
worker 12 25 >"$OUT/worker_large.txt" & large=$!
sleep 15
python3 -P -m gpuwatch.client.cli --socket $sock ps >"$OUT/ps.txt"
python3 -P -m gpuwatch.client.cli --socket $sock ps --json >"$OUT/ps.json"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits >"$OUT/nvidia_smi.csv"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9445/metrics').read().decode())" \
  | grep -E '^gpuwatch_(process_(device|nvml|untracked)_memory_bytes|gpu_|process_launches_total)' >"$OUT/metrics.txt"
if command -v tmux >/dev/null; then
  tmux -L gwval new-session -d -s top -x 120 -y 24 "python3 -P -m gpuwatch.client.cli --socket $sock top --interval 1"
  sleep 4; tmux -L gwval capture-pane -p -t top >"$OUT/top_120.txt"
  tmux -L gwval resize-window -t top -x 80 -y 24; sleep 3; tmux -L gwval capture-pane -p -t top >"$OUT/top_80.txt"
  tmux -L gwval send-keys -t top q; sleep 1; tmux -L gwval kill-server 2>/dev/null || true
else  # no tmux here: render the lines top draws, from the same code, at both widths
  for w in 120 80; do
    python3 -P - "$sock" "$w" >"$OUT/top_$w.txt" <<'PY'
import sys, time
from gpuwatch.core.protocol import Client
from gpuwatch.exporters.top import Top, ViewState, plain, row_line
def fetch():
    with Client(sys.argv[1]) as c:
        return c.call("ps"), c.call("status")
top, width = Top(fetch, ViewState()), int(sys.argv[2])
top.refresh(); time.sleep(1); top.refresh()
print("(rendered without a terminal: no tmux on this machine)")
for line in top.header_lines(width):
    print(plain(line))
for row in top.visible():
    print(row_line(row, width))
PY
  done
fi
wait $small $large
kill -TERM $daemon; wait $daemon || true
echo "== ps"; cat "$OUT/ps.txt"; echo "== nvidia-smi (pid, MiB)"; cat "$OUT/nvidia_smi.csv"
echo "== metrics"; cat "$OUT/metrics.txt"; echo "== top 120"; cat "$OUT/top_120.txt"; echo "== top 80"; cat "$OUT/top_80.txt" 2>/dev/null
echo "== workers"; cat "$OUT"/worker_*.txt
