import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
from slm_export.quantize import quantizer
from slm_export.quantize.plan import WeightPlan
rng = np.random.default_rng(0)
out = {}
for name, (rows, k) in {"3B down 3072x8192": (3072, 8192), "3B gate|up 16384x3072": (16384, 3072)}.items():
    w = rng.normal(0, 0.02, (rows, k)).astype(np.float32)
    x = rng.normal(0, 1, (2048, k)).astype(np.float32)
    h = (x.T @ x / 2048).astype(np.float32)
    wp = WeightPlan.of((rows, k), 4, 32, True, method="gptq")
    t = time.perf_counter(); quantizer._quantize_one(wp, w, h); out[name] = round(time.perf_counter() - t, 1)
print(sys.argv[1], out)
