"""memlog.py CMD...: run CMD, sample the process tree's RSS every 0.2 s, timestamp its stderr lines;
print the peak and the phase (last stderr line) it happened in, and RSS at each phase change."""
import subprocess, sys, threading, time, os
t0 = time.time()
p = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)
phase = ["start"]; log = []
def rd():
    for line in p.stderr:
        line = line.rstrip()
        if line:
            phase[0] = line[:90]; log.append((time.time() - t0, line[:120]))
            print(f"[{time.time()-t0:7.1f}s] {line}", flush=True)
threading.Thread(target=rd, daemon=True).start()
def tree_rss(pid):
    tot = 0
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        for l in open(f"/proc/{pid}/status"):
            if l.startswith("VmRSS"): tot += int(l.split()[1])
        for k in kids: tot += tree_rss(int(k))
    except Exception: pass
    return tot
peak = (0, 0, "")
samples = []
while p.poll() is None:
    r = tree_rss(p.pid) / 1024
    samples.append((time.time() - t0, r, phase[0]))
    if r > peak[0]: peak = (r, time.time() - t0, phase[0])
    time.sleep(0.2)
print(f"rc {p.returncode} wall {time.time()-t0:.0f}s peak {peak[0]:.0f} MB at {peak[1]:.0f}s during: {peak[2]}")
# max RSS per phase
per = {}
for t, r, ph in samples:
    key = ph.split(" ")[0:4]; key = " ".join(key)
    if r > per.get(key, (0,0))[0]: per[key] = (r, t)
for k, (r, t) in sorted(per.items(), key=lambda kv: kv[1][1]):
    print(f"  {t:7.0f}s {r:7.0f} MB  {k}")
