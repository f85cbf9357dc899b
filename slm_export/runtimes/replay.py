"""Replay a list of KV-cache steps on an artifact and keep every output.

This is how `verify` runs an artifact somewhere else (an emulated ARM CPU, another process) with
exactly the calls it makes in-process:

    python -m slm_export.runtimes.replay FOLDER STEPS.json OUT.npz [--threads N]

STEPS.json is a list of {"reset": capacity} and {"forward": [ids], "all_logits": bool}; OUT.npz
holds out_0, out_1, ... one array per forward, in order. Imports numpy and the runtime only.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def run_steps(runner, steps: list[dict]) -> list[np.ndarray]:
    outputs = []
    for step in steps:
        if "reset" in step:
            runner.reset(int(step["reset"]))
        else:
            outputs.append(runner.forward(step["forward"], all_logits=bool(step.get("all_logits"))))
    return outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slm_export.runtimes.replay")
    ap.add_argument("folder")
    ap.add_argument("steps")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    from ..errors import SlmExportError
    from . import open_folder_runner

    try:
        runner = open_folder_runner(a.folder, a.threads)  # the parent checked the files
        outputs = run_steps(runner, json.loads(open(a.steps).read()))
    except SlmExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    np.savez(a.out, **{f"out_{i}": x for i, x in enumerate(outputs)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
