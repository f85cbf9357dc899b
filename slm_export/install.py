"""The packages pip does not install with slm-export itself, and how to get each (pyproject.toml's extras).

Keyed by the name Python imports; the CLI's one-line "not installed" errors and the runtimes' refusals read it.
"""
INSTALL = {
    "torch": "pip install torch==2.13.0 (the CPU build this project is tested with; install it before slm-export)",
    "executorch": 'pip install "slm-export[executorch]"', "torchao": 'pip install "slm-export[executorch]"',
    "coremltools": 'pip install "slm-export[coreml]"', "onnxruntime_genai": 'pip install "slm-export[genai]"',
}
