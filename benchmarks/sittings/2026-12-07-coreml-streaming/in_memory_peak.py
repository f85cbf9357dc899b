"""Peak RSS of a Core ML export of the bundled model loaded whole (not streamed), as the API does for a
model already in memory: load(stream=False), then export, in this process (ru_maxrss, model load included).

    .venv/bin/python benchmarks/sittings/2026-12-07-coreml-streaming/in_memory_peak.py 4 rtn /tmp/out-4
    .venv/bin/python benchmarks/sittings/2026-12-07-coreml-streaming/in_memory_peak.py 8 default /tmp/out-8
"""
import resource
import sys
import time

import slm_export
from slm_export.loading import load

bits, flags, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
extra = dict(quant_method="rtn", mixed_precision=0.0) if flags == "rtn" else {}
model = load(None, stream=False)
t = time.perf_counter()
slm_export.export(model, target="coreml", bits=bits, out=out, log=lambda *a: None, skip_memory_check=True, **extra)
print(f"coreml int{bits} {flags}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20:.0f} MiB, "
      f"export {time.perf_counter() - t:.1f} s")
