"""The `slm-export` command: a thin layer over the Python API, with argparse subcommands.

argparse (the standard library) rather than click or typer: nothing to install, and its subparsers give
each command its own --help. `slm-export` alone, or `--help`, lists the commands (COMMANDS) and exits.
`slm-export --target onnx ...` (options without a command) is shorthand for `slm-export export ...`.

Output: results go to stdout (`--format` chooses how: a table or text, or json; bench also markdown, csv,
jsonl); `--json FILE` writes the same results as JSON to FILE as well, on every command that has results;
progress goes to stderr (`--quiet` silences it).

Exit codes: 0 ok, 1 parity over tolerance (fit: does not fit), 2 bad input (also: an export this
machine has too little memory or disk for, refused before the model loads; a missing package), 3
internal error, ran out of memory mid-way, or a failed bench run, 4 the runtime cannot execute here
(Core ML off macOS), 130/143 interrupted by Ctrl-C/SIGTERM (nothing half-written is left behind).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .argtypes import float_in, int_list_at_least, non_negative_int, positive_int
from .errors import SlmExportError
from .install import INSTALL
from .units import GB, MB

# Each command and the one line `slm-export --help` says about it, in the order a newcomer meets them.
COMMANDS = {
    "demo": "export the bundled model to ONNX int4, answer a question, verify and bench it",
    "export": "quantize a model and write an ONNX, ExecuTorch or Core ML folder",
    "generate": "answer a prompt with an exported folder",
    "verify": "parity of an exported folder against PyTorch (exit 1 when over tolerance)",
    "bench": "latency and memory: here, on a board over SSH, or simulated",
    "fit": "will a model fit on a device, and how fast, before exporting (exit 1 when not)",
    "devices": "the device profiles, built in and yours",
    "bundle": "a folder (and a zip) for the app developer",
    "inspect": "what a bundle holds, checksum status, its last parity and bench",
    "targets": "the export targets",
}
EPILOG = """\
`slm-export COMMAND --help` shows a command's options. `slm-export --target onnx ...` (options, no command)
is short for `slm-export export ...`. Results print on stdout (`--format`); `--json FILE` also writes them
as JSON; progress goes to stderr (`--quiet` silences it).

Exit codes: 0 ok; 1 parity over tolerance, or fit: does not fit; 2 bad input, a missing package, or an
export this machine has too little memory or disk for; 3 internal error, out of memory mid-way, or a failed
bench run; 4 the runtime cannot execute here (Core ML off macOS); 130/143 interrupted (Ctrl-C/SIGTERM).
"""
THIS_MACHINE = "local"  # the name of this machine as a --device, in bench, verify and fit alike


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise SlmExportError(f"{message} (see `{self.prog} --help`)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in text and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr (results still print)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    """The target, the quantization spec, compute precision and KV-cache bits: shared by export and fit."""
    p.add_argument("-t", "--target", default="onnx", help="export target: onnx, executorch or coreml (see `slm-export targets`)")
    p.add_argument("--bits", type=int, default=4, help="weight bits: 4, 8 or 16 (= no quantization)")
    p.add_argument("--group-size", type=int, default=32, help="quantization group (block) size, a power of two")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric (zero-point) weight quantization")
    p.add_argument("--weight-only", action="store_true",
                   help="keep activations float (= --activations float)")
    p.add_argument("--activations", default=None, choices=["int8", "float"],
                   help="int8: quantized on the fly (ONNX accuracy_level 4, ExecuTorch 8da4w/8da8w); float: weight-only; "
                        "default: int8, but float for ExecuTorch --bits 8 and Core ML")
    p.add_argument("--no-quantize-embeddings", action="store_true", help="keep the token embedding float")
    p.add_argument("--embedding-bits", type=int, default=None,
                   help="8 or 4; default: 4 for ExecuTorch at --bits 4, else 8. ONNX: a tied embedding at the "
                        "lm_head's bits reads its rows from the lm_head's weights (one table)")
    p.add_argument("--no-quantize-lm-head", action="store_true", help="keep the lm_head float")
    p.add_argument("--lm-head-bits", type=int, default=None,
                   help="8 or 4; default: --bits. 8 at --bits 4 keeps the output layer int8 (like llama.cpp's "
                        "Q4_0, whose output tensor is Q8_0): lower KL, slower decode on large vocabularies")
    p.add_argument("--quant-method", default=None, metavar="NAME",
                   help="how codes and scales are chosen: rtn, mse, hqq, gptq, awq (gptq and awq are calibrated "
                        "on text; awq first rescales norms and weights; see docs/quantization.md); default: the "
                        "target's")
    p.add_argument("--mixed-precision", type=float, default=None, metavar="FRACTION",
                   help="at --bits 4, up to FRACTION more size for int8 on the weights whose int4 rounding costs "
                        "the most (measured on the calibration text), like llama.cpp's Q4_K_M; 0 = off; "
                        "default: the target's")
    p.add_argument("--compute-precision", default=None, choices=["float16", "float32"],
                   help="Core ML: float16 (default) or float32; ExecuTorch: float32 (default) or float16 "
                        "(an fp16 program, with --bits 16); ONNX: float32")
    p.add_argument("--kv-bits", type=int, default=None, choices=[32, 16, 8],
                   help="ExecuTorch: 16 stores the KV cache as fp16 (half the memory, runs in slm-export's runner), "
                        "8 as int8 rows with scales (a quarter, runs in ExecuTorch's Python bindings); "
                        "ONNX: 8 stores it as int8 with per-channel scales calibrated at export (a quarter; "
                        "faster decode after long prompts, slower prefill); Core ML: 16 only (a float16 state); default: 32 (Core ML: 16)")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    _add_quant_args(p)
    p.add_argument("--palettize", action="store_true",
                   help="Core ML: k-means palettes of 2**bits entries per 16 output channels instead of int scales")
    p.add_argument("-m", "--model", default=None, help="hub id, local HF folder or .gguf file; default: bundled SmolLM2-135M-Instruct")
    p.add_argument("-o", "--out", default=None, help="output folder (default: ./<target>-<quant label>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-context", type=int, default=None,
                   help="maximum tokens in the KV cache; default min(2048, the model's limit)")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="calibrate on this UTF-8 text (up to 2048 tokens) instead of the shipped calibration passage: "
                        "--quant-method gptq or awq, --mixed-precision, and ONNX --kv-bits 8's cache scales")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="export without the model's tokenizer (a model without tokenizer files is refused otherwise); "
                        "generate then cannot run, verify and bench use random token ids")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model's repository")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="export even where the estimated peak memory (see `slm-export fit`) exceeds what this "
                        "machine has (free memory, cgroup limit, ulimit -v); it may then be killed")


def _runtime_words(value: str) -> str:
    from .bench import runtime_words

    return runtime_words(value)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int_list_at_least(1), default="32,512",
                   help="comma-separated prompt lengths; default 32,512")
    p.add_argument("--decode-tokens", type=positive_int, default=128, help="tokens generated (and timed) per run")
    p.add_argument("--warmup", type=non_negative_int, default=8, help="decode steps run before timing starts")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per prompt length (medians are reported)")
    p.add_argument("--threads", type=positive_int, default=None, help="runtime threads; default: all cores")
    p.add_argument("--runtime", default="ours", metavar="NAME[,NAME]", type=_runtime_words,
                   help="what runs the artifact: ours (slm-export's runner), stock (the runtime an app uses as it is: "
                        "onnxruntime-genai for ONNX, ExecuTorch's TextLLMRunner, executorch-llm-runner, for a .pte), "
                        "all (both, a row each), or a stock runtime's name; measured alike, on this machine")
    p.add_argument("-d", "--device", default=THIS_MACHINE,
                   help="local (this machine, default), ssh://user@host[:port], sim:PROFILE (ARM profiles: the real ARM runtime "
                        "under QEMU, no timings), limits:PROFILE (this machine's runtime under the profile's threads and "
                        "memory), adb[:SERIAL], simctl[:UDID], or a profile with an address (see `slm-export devices`)")
    p.add_argument("--identity", default=None, help="SSH: private key file (default: the agent, then ~/.ssh keys)")
    p.add_argument("--known-hosts", default=None, help="SSH: known_hosts file (default ~/.ssh/known_hosts)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="SSH: trust a host not yet in known_hosts and save its key (a changed key is always refused)")
    p.add_argument("--provision", action="store_true",
                   help="SSH: install numpy and the artifact's runtime into a venv on the device first")
    p.add_argument("--remote-python", default=None, help="SSH/adb: the Python to run on the device")
    p.add_argument("--format", default="table", choices=["table", "markdown", "json", "csv", "jsonl"],
                   help="how the results print on stdout")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the results as JSON to FILE")


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=positive_int, default=128, help="prompt positions compared; default 128")
    p.add_argument("--decode-steps", type=non_negative_int, default=32,
                   help="decode steps through the KV cache after the prompt; default 32")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity on the shipped passage")
    p.add_argument("--format", default="text", choices=["text", "json"], help="how the report prints on stdout")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the parity report as JSON to FILE")
    p.add_argument("--junit-xml", default=None, help="write the result as JUnit XML (one test case per reference)")
    p.add_argument("-d", "--device", default=THIS_MACHINE,
                   help="local (this machine, default), or sim:PROFILE: run on that device's real ARM runtime under QEMU emulation "
                        "and also compare with this machine's run; limits:PROFILE: this machine's runtime under its limits")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="runtime threads; default: all cores (capped by a device profile)")
    p.add_argument("-m", "--model", default=None, metavar="PATH|ID",
                   help="the model the artifact was exported from (a folder, .gguf file or hub id); default: the "
                        "one its manifest names, found where this machine read it")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="the --calibration-text file the artifact was exported with (its manifest gives its name "
                        "and sha256); needed where this machine did not read it")


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--device", required=True,
                   help="a device profile (see `slm-export devices`; `local` is this machine); sim:NAME and limits:NAME also accepted")
    _add_quant_args(p)
    p.add_argument("--context", type=positive_int, default=2048, help="tokens of KV cache to plan for; default 2048")
    p.add_argument("--prompt-tokens", type=positive_int, default=128, help="longest prompt prefilled in one pass; default 128")
    p.add_argument("-m", "--model", default=None, help="hub id, local folder or .gguf; default: bundled SmolLM2-135M-Instruct")
    p.add_argument("--artifact", default=None, help="an exported folder: use its real per-weight sizes")
    p.add_argument("--format", default="text", choices=["text", "json"], help="how the report prints on stdout")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model's repository")


def build_parser() -> argparse.ArgumentParser:
    """`slm-export` with one subcommand per COMMANDS entry."""
    from . import __version__

    root = _Parser(prog="slm-export", formatter_class=_Formatter,
                   description="Quantize a small language model, export it to ONNX, ExecuTorch or Core ML, prove "
                               "parity with PyTorch, measure it, and hand it to app developers.",
                   epilog=EPILOG)
    root.add_argument("--version", action="version", version=f"slm-export {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for name, line in COMMANDS.items():
        p = sub.add_parser(name, help=line, description=line[0].upper() + line[1:] + ".", formatter_class=_Formatter)
        _add_common_args(p)
        _COMMAND_ARGS[name](p)
    return root


def _demo_args(p):
    _add_export_args(p)
    _add_bench_args(p)
    p.set_defaults(out="smollm2-onnx-int4")


def _artifact_arg(p):
    p.add_argument("artifact", help="an exported folder, a bundle folder or a bundle .zip")


def _bundle_args(p):
    _artifact_arg(p)
    p.add_argument("-o", "--out", default=None, help="bundle folder (default: <artifact>-bundle)")
    p.add_argument("--zip", action="store_true", help="also write <bundle>.zip")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")


def _inspect_args(p):
    _artifact_arg(p)
    p.add_argument("--format", default="text", choices=["text", "json"], help="how the report prints on stdout")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the report as JSON to FILE")


def _verify_args(p):
    _artifact_arg(p)
    _add_verify_args(p)


def _bench_args(p):
    _artifact_arg(p)
    _add_bench_args(p)


def _generate_args(p):
    _artifact_arg(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt (wrapped in the model's chat template unless --raw)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k cut (default)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=non_negative_int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def _devices_args(p):
    p.add_argument("name", nargs="?", help="show one profile in full; or `prepare` with a device")
    p.add_argument("device", nargs="?", help="with prepare: sim:PROFILE, the emulated ARM device to build once")


_COMMAND_ARGS = {"export": _add_export_args, "demo": _demo_args, "generate": _generate_args, "verify": _verify_args,
                 "bench": _bench_args, "fit": _add_fit_args, "devices": _devices_args, "bundle": _bundle_args,
                 "inspect": _inspect_args, "targets": lambda p: None}


def _quant_kwargs(a) -> dict:
    return dict(bits=a.bits, group_size=a.group_size, symmetric=not a.asymmetric,
                activations="float" if a.weight_only else a.activations, embedding_bits=a.embedding_bits,
                lm_head_bits=a.lm_head_bits, method=a.quant_method, mixed_precision=a.mixed_precision)


def _spec_kwargs(a) -> dict:
    q = _quant_kwargs(a)
    q["quant_method"] = q.pop("method")
    return dict(target=a.target, **q, quantize_embeddings=not a.no_quantize_embeddings,
                quantize_lm_head=not a.no_quantize_lm_head, palettize=a.palettize,
                compute_precision=a.compute_precision, kv_bits=a.kv_bits, calibration_text=a.calibration_text, out=a.out, force=a.force, max_context=a.max_context,
                no_tokenizer=a.no_tokenizer, trust_remote_code=a.trust_remote_code,
                skip_memory_check=a.skip_memory_check)


def cmd_export(a):
    import slm_export

    art = slm_export.export(a.model, **_spec_kwargs(a))
    print(f"next: slm-export verify {art.path}   |   slm-export bench {art.path}   |   "
          f"slm-export generate {art.path} --prompt \"...\"")
    return 0


def _bench(art, a):
    from .results import PRINTERS, format_json

    options = dict(identity=a.identity, known_hosts=a.known_hosts, accept_new_host_key=a.accept_new_host_key or None,
                   provision=a.provision or None, remote_python=a.remote_python)
    rows = art.bench(device=a.device, prompt_tokens=a.prompt_tokens,
                     decode_tokens=a.decode_tokens, warmup=a.warmup, repeats=a.repeats, threads=a.threads,
                     runtime=a.runtime, device_options={k: v for k, v in options.items() if v is not None})
    print(PRINTERS[a.format](rows))
    if a.json_out:
        Path(a.json_out).write_text(format_json(rows))
    return rows


def _check_report_files(a) -> None:
    """Report files written at the end of a long run are checked before it starts."""
    from .staging import check_output_file

    for flag, path in (("--json", getattr(a, "json_out", None)), ("--junit-xml", getattr(a, "junit_xml", None))):
        if path:
            check_output_file(path, flag)


def cmd_bench(a):
    from .artifact import Artifact

    _check_report_files(a)
    rows = _bench(Artifact.open(a.artifact), a)
    return 0 if all(r.error is None for r in rows) else 3


def cmd_verify(a):
    from .artifact import Artifact
    from .verify import check, write_json, write_junit_xml

    _check_report_files(a)
    art = Artifact.open(a.artifact)
    report = art.verify(prompt_tokens=a.prompt_tokens, decode_steps=a.decode_steps, perplexity=not a.no_perplexity,
                        device=a.device, threads=a.threads, model_path=a.model, calibration_text=a.calibration_text)
    print(json.dumps(report.to_dict(), indent=1) if a.format == "json" else report.format())
    if a.json_out:
        write_json(report, a.json_out)
    if a.junit_xml:
        write_junit_xml(report, a.junit_xml)
    check(report)
    return 0


def cmd_bundle(a):
    from .artifact import Artifact

    out = Artifact.open(a.artifact).bundle(out=a.out, make_zip=a.zip, force=a.force)
    print(f"wrote {out}" + (f" and {out.with_suffix('.zip')}" if a.zip else ""))
    return 0


def cmd_inspect(a):
    from .bundle import format_inspect, inspect

    _check_report_files(a)
    info = inspect(a.artifact)
    print(json.dumps(info, indent=1) if a.format == "json" else format_inspect(info))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(info, indent=1))
    return 0 if info["checksums"].startswith("ok") else 2


def cmd_generate(a):
    from .artifact import Artifact

    art = Artifact.open(a.artifact)
    t = time.perf_counter()
    art.generate(a.prompt, max_new_tokens=a.max_new_tokens, chat=not a.raw, temperature=a.temperature,
                 top_k=a.top_k, top_p=a.top_p, seed=a.seed, on_text=lambda s: print(s, end="", flush=True))
    print(flush=True)
    print(f"({time.perf_counter() - t:.2f}s)", file=sys.stderr)
    return 0


def cmd_demo(a):
    """The main job on the bundled model: export, verify, generate, bench, one table."""
    from .verify import check

    import slm_export

    _check_report_files(a)
    art = slm_export.export(a.model, **_spec_kwargs(a))
    print(f"\n$ slm-export generate {art.path} --prompt \"What is the capital of France?\"")
    print(art.generate("What is the capital of France?", max_new_tokens=32))
    print(f"\n$ slm-export verify {art.path}")
    report = art.verify()
    print(report.format())
    print(f"\n$ slm-export bench {art.path}")
    _bench(art, a)
    check(report)
    return 0


def cmd_targets(a):
    from .exporters import TARGETS

    print("\n".join(TARGETS.names()))
    return 0


def cmd_fit(a):
    from .devices.profiles import load_profile
    from .fit import fit
    from .quantize import QuantSpec

    _check_report_files(a)
    spec = QuantSpec(**_quant_kwargs(a), embeddings=not a.no_quantize_embeddings, lm_head=not a.no_quantize_lm_head)
    report = fit(load_profile(a.device.removeprefix("sim:").removeprefix("limits:")), target=a.target, spec=spec, context=a.context,
                 prompt_tokens=a.prompt_tokens, model=a.model, artifact=a.artifact, compute_precision=a.compute_precision,
                 kv_bits=a.kv_bits, trust_remote_code=a.trust_remote_code)
    print(json.dumps(report.to_dict(), indent=1) if a.format == "json" else report.format())
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report.to_dict(), indent=1))
    return 0 if report.fits else 1


def cmd_devices(a):
    from .devices.profiles import load_profile, profile_names, user_dir

    if a.name == "prepare":
        return _prepare_device(a.device)
    if a.device:
        raise SlmExportError(f"`slm-export devices {a.name} {a.device}`: only `prepare` takes a device")
    if a.name:
        p = load_profile(a.name)
        print(f"{p.name}: {p.description}  ({p.path})")
        for k, v in p.summary().items():
            print(f"  {k:<26} {v}")
        print(f"  {'formats':<26} {', '.join(p.formats)}")
        return 0
    for name in profile_names():
        p = load_profile(name)
        print(f"{name:<22} {p.app_budget_mb * MB / GB:5.1f} GB app budget  {p.sustained_bandwidth_gb_s:5.1f} GB/s  "
              f"{', '.join(p.formats):<24} {p.description}")
    print(f"\nadd your own: {user_dir()}/NAME.toml (fields: slm_export/devices/profiles/README.md)")
    return 0


def _prepare_device(spec: str | None) -> int:
    from .devices import open_device
    from .devices.emulation import RUNTIME_WHEELS, smoke_test

    if not spec:
        raise SlmExportError("`devices prepare` needs a device: e.g. `slm-export devices prepare sim:raspberry-pi-5`")
    dev = open_device(spec)
    if not getattr(dev, "emulates", False):
        raise SlmExportError(f"nothing to prepare for '{spec}': `devices prepare` builds an emulated ARM device, "
                             "e.g. `slm-export devices prepare sim:raspberry-pi-5` (profiles with a qemu_cpu)")
    for runtime in RUNTIME_WHEELS:
        arm = dev.arm(runtime)
        print(f"{dev.name}: {smoke_test(arm, runtime)}")
        print(f"  root {arm.root}\n  site {arm.site}")
    return 0


NEEDS_TORCH = ("export", "demo", "verify")  # they load the model in PyTorch


def _check_packages(command: str) -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        found = False
    if command in NEEDS_TORCH and not found:
        raise SlmExportError(f"`slm-export {command}` needs PyTorch, which is not installed: {INSTALL['torch']}")


def _missing_package(e: BaseException) -> str | None:
    """One line for an import of a package that is not installed (anywhere in the exception's chain)."""
    while e is not None:
        if isinstance(e, ModuleNotFoundError) and e.name:
            top = e.name.split(".")[0]
            how = INSTALL.get(top, f"pip install {top}" if top not in ("slm_export",) else None)
            if how:
                return f"the Python package '{top}' is not installed: {how}"
        e = e.__cause__ or e.__context__
    return None


HANDLERS = {"export": cmd_export, "verify": cmd_verify, "bench": cmd_bench, "generate": cmd_generate,
            "bundle": cmd_bundle, "inspect": cmd_inspect, "demo": cmd_demo, "targets": cmd_targets,
            "fit": cmd_fit, "devices": cmd_devices}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a timeout, CI cancellation, `docker stop`), raised like Ctrl-C so every cleanup runs."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut short the cleanup the first started
    raise _Terminated()


@contextmanager
def _sigterm_as_interrupt():
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # main() called outside the main thread: signals stay the caller's
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import os

    # transformers' config warnings are noise for a CLI user; errors still reach us as exceptions.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers imports torchao when it is installed (the executorch target needs it).
    from .quiet import quiet_third_party

    quiet_third_party()
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    parser = build_parser()
    if not argv:  # what people type to see what a tool does: the commands, nothing run
        parser.print_help()
        return 0
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "export")  # the documented shorthand: `slm-export --target onnx ...`
    command = argv[0]
    if command not in COMMANDS and not command.startswith("-"):
        # `slm-export ./my-model` is the likeliest slip: the model is an option, not a word.
        hint = (f"; to export it, pass it as --model: slm-export export --model {command}"
                if "/" in command or "." in command or os.path.exists(command) else "")
        print(f"slm-export: error: unknown command '{command}'; commands: {', '.join(COMMANDS)}{hint}", file=sys.stderr)
        return 2
    if command == "export" and argv[1:2] and not argv[1].startswith("-"):
        word = argv[1]
        print(f"slm-export: error: `slm-export export` takes the model as an option; pass it as --model: slm-export export --model {word}",
              file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        from . import progress

        progress.set_quiet(args.quiet)
        _check_packages(command)
        return HANDLERS[command](args)
    except SlmExportError as e:
        if debug:
            raise
        print(f"slm-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"slm-export: {'terminated' if terminated else 'interrupted'} (nothing half-written was left behind)",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # 143 or 130, as a shell reports them
    except Exception as e:  # a bug of ours: say so in one line, keep the traceback one flag away
        if debug:
            raise
        missing = _missing_package(e)
        if missing:
            print(f"slm-export: error: {missing}", file=sys.stderr)
            return 2
        from .memory import is_out_of_memory

        if is_out_of_memory(e):  # a MemoryError, or a failed allocation or mapping, outside an export
            print(f"slm-export: error: `slm-export {command}` ran out of memory ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no message'}); free memory or "
                  "raise the limit", file=sys.stderr)
            return 3
        print(f"slm-export: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
