"""One command, one sitting: slm-export's targets against the peers, on three model shapes.

    .venv/bin/python benchmarks/run.py                      # everything (about 2 hours; peers' venvs made once)
    .venv/bin/python benchmarks/run.py --models smollm2-135m --rounds 1 --peers llama.cpp   # quicker

Systems, each exported from the same Hugging Face folder (benchmarks/models.py) and measured the same way:
slm-export ONNX and ExecuTorch at 16/8/4 bits; llama.cpp Q4_0/Q8_0 (and the shipped Q4_1 GGUF);
onnxruntime-genai's model builder int4; optimum-onnx fp32/int8 and optimum-executorch 8da4w, each in its
own venv (their transformers pins conflict with ours); PyTorch eager fp32 with its KV cache.

Protocol (benchmarks/peers/protocol.py, the same as `slm-export bench`): one process per system and
prompt length; prompts of 32 and 512 tokens of the shipped passage; TTFT = median of 3; decode = 8 warm-up
then 128 timed single-token greedy steps; peak RSS = that process's VmHWM. Rounds alternate all systems
(this 2-core VM is shared; a slow spell hits everyone); the median round is reported, all are kept.
Quality: teacher-forced logits on the first 512 tokens of the passage against PyTorch eager fp32 (real
model only). A system that fails to install, export or run is a row with its error, never dropped.

Writes benchmarks/results.json, benchmarks/RESULTS.md and benchmarks/plots/*.png. Progress (exports and timed
systems done, time so far, an ETA) goes to stderr.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "peers"), str(HERE.parent)]

import numpy as np  # noqa: E402

import models  # noqa: E402
import ours  # noqa: E402
import report  # noqa: E402
from common import PeerError, now  # noqa: E402
from slm_export import progress  # noqa: E402
from slm_export.devices.local import describe  # noqa: E402
from slm_export.loading import default_gguf_path  # noqa: E402
from slm_export.results import BenchResult  # noqa: E402

PEERS = {  # --peers name -> module in benchmarks/peers
    "llama.cpp": "llamacpp", "onnxruntime-genai": "ortgenai", "optimum-onnx": "optimum_onnx",
    "optimum-executorch": "optimum_executorch", "pytorch": "torch_eager",
}


@dataclass
class System:
    name: str  # e.g. "slm-export onnx int4-g32-sym-a8", "llama.cpp Q4_0"
    family: str  # "slm-export" or the peer's NAME
    fmt: str  # artifact format: onnx, pte, gguf, safetensors
    info: dict  # export figures: artifact, quant, artifact_mb, export_s, export_peak_rss_mb
    bench: Callable  # (prompts, args) -> list[BenchResult]
    logits: Callable  # (ids, out_npy, threads) -> None


def peer_rows(sysname: str, peer, py, info: dict, model: str, fmt: str) -> Callable:
    def bench(prompts, args) -> list[BenchResult]:
        rows = peer.bench(py, info["artifact"], prompts, args.decode_tokens, 8, 3, args.threads)
        out = []
        for r in rows:
            gb_s = info["artifact_mb"] * r["decode_tok_s"] / 1000  # every weight byte read once per token
            out.append(BenchResult(system=sysname, model=model, target=fmt, runtime=peer.NAME, quant=info["quant"],
                                   artifact_mb=info["artifact_mb"], machine=describe(), timestamp=now(),
                                   decode_gb_s=gb_s, **r))
        return out
    return bench


def prepare(model: str, hf: Path, args) -> tuple[list[System], list[BenchResult]]:
    """Export every system once (timed, peak RSS); failures become rows."""
    systems, failed = [], []
    work = args.work / "artifacts" / model
    shutil.rmtree(work, ignore_errors=True)  # every export is made, timed and measured in this sitting

    def fail(name: str, family: str, e: Exception) -> None:
        print(f"  {name}: FAILED {e}", flush=True)
        failed.append(BenchResult(system=name, model=model, runtime=family, error=str(e), machine=describe(),
                                  timestamp=now()))

    # (target, bits, kv_bits, compute precision, lm_head bits); None = the target's default
    variants = [(target, bits, None, None, None) for target in args.targets for bits in args.bits]
    if "executorch" in args.targets:
        variants += [("executorch", bits, 16, None, None) for bits in args.executorch_kv16]
        variants += [("executorch", 16, None, "float16", None)] if args.executorch_fp16 else []
    if "onnx" in args.targets:
        variants += [("onnx", bits, 8, None, None) for bits in args.onnx_kv8]
        variants += [("onnx", bits, 8, None, 8) for bits in args.onnx_head8]
    peers = {key: __import__(PEERS[key]) for key in args.peers}
    count = progress.Count(f"{model}: exports", len(variants) + sum(len(p.VARIANTS) for p in peers.values()))
    for target, bits, kv_bits, precision, head_bits in variants:
        kv = f" kv{kv_bits}" if kv_bits else ""
        head = f" head{head_bits}" if head_bits else ""
        name = f"slm-export {target} {'fp16 program' if precision else f'{bits}-bit'}{head}{kv}"
        print(f"  exporting {name}", flush=True)
        try:
            folder = f"slm-{target}-{bits}{kv.strip()}{'-' + precision if precision else ''}{head.replace(' ', '-')}"
            info = ours.export(hf, work / folder, target, bits, kv_bits, precision, head_bits)
        except PeerError as e:
            fail(name, "slm-export", e)
            continue
        finally:
            count.step()
        name = f"slm-export {target} {info['quant']}{kv}"

        def bench(prompts, a, art=info["artifact"]):
            rows = ours.bench(art, [len(p) for p in prompts], a.decode_tokens, 8, 3, a.threads)
            for r in rows:
                r.model = model
            return rows
        systems.append(System(name, "slm-export", target, info, bench,
                              lambda ids, out, t, art=info["artifact"]: ours.logits(art, ids, out, t)))
    for key, peer in peers.items():
        try:
            py = peer.ensure_venv()
        except PeerError as e:
            fail(peer.NAME, peer.NAME, e)
            count.step(len(peer.VARIANTS))
            continue
        variants = list(peer.VARIANTS)
        for variant in variants:
            name = f"{peer.NAME} {variant}"
            print(f"  exporting {name}", flush=True)
            try:
                info = peer.export(py, hf, work / f"{PEERS[key]}-{variant}", variant)
            except PeerError as e:
                fail(name, peer.NAME, e)
                continue
            finally:
                count.step()
            fmt = Path(info["artifact"]).suffix.lstrip(".") or info.get("format", key)
            systems.append(System(name, peer.NAME, fmt, info, peer_rows(name, peer, py, info, model, fmt),
                                  lambda ids, out, t, p=peer, py=py, art=info["artifact"]: p.logits(py, art, ids, out, t)))
        if key == "llama.cpp" and model == "smollm2-135m":  # the GGUF that ships with the model, as users get it
            info = {"artifact": str(default_gguf_path()), "quant": "Q4_1 (shipped)", "export_s": None,
                    "export_peak_rss_mb": None, "artifact_mb": round(default_gguf_path().stat().st_size / 1e6, 2)}
            name = "llama.cpp Q4_1 (shipped)"
            systems.append(System(name, peer.NAME, "gguf", info, peer_rows(name, peer, py, info, model, "gguf"),
                                  lambda ids, out, t, p=peer, py=py, art=info["artifact"]: p.logits(py, art, ids, out, t)))
    return systems, failed


def quality(systems: list[System], hf: Path, ids: list[int], threads: int, work: Path) -> dict[str, tuple]:
    """name -> (mean KL vs PyTorch fp32, top-1 agreement, error or None); PyTorch eager is the reference."""
    import torch_eager

    tmp = work / "logits"
    tmp.mkdir(parents=True, exist_ok=True)
    ref_npy = tmp / "pytorch-fp32.npy"
    torch_eager.logits(Path(sys.executable), hf, ids, ref_npy, threads)
    ref = np.load(ref_npy).astype(np.float64)
    ref_logp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    out = {}
    for s in systems:
        if s.family == torch_eager.NAME:
            continue  # the reference itself
        npy = tmp / "system.npy"
        try:
            s.logits(ids, npy, threads)
        except PeerError as e:
            out[s.name] = (None, None, str(e))
            continue
        got = np.load(npy).astype(np.float64)[:, : ref.shape[1]]  # a padded vocabulary's extra columns
        logp = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
        kl = float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)))
        top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        out[s.name] = (kl, top1, None)
        print(f"  quality {s.name}: KL {kl:.4f}, top-1 {top1:.3f}", flush=True)
    return out


def median_rounds(rounds: list[list[BenchResult]]) -> list[BenchResult]:
    """Per system and prompt, the round with the median decode speed; every round's figures are kept."""
    out = []
    for row in rounds[0]:
        same = [r for rnd in rounds for r in rnd if r.system == row.system and r.prompt_tokens == row.prompt_tokens]
        ok = sorted((r for r in same if r.error is None), key=lambda r: r.decode_tok_s)
        pick = ok[len(ok) // 2] if ok else row
        pick.samples["rounds_decode_tok_s"] = [r.decode_tok_s for r in same]
        pick.samples["rounds_ttft_ms"] = [r.ttft_ms for r in same]
        out.append(pick)
    return out


def run_model(model: str, args) -> list[BenchResult]:
    print(f"== {model}", flush=True)
    model_label = models.label(model)
    hf, real_weights = models.hf_folder(model, args.work / "models")
    from tokenizers import Tokenizer

    text_ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode((HERE.parent / "slm_export" / "data" /
                                                                      "passage.txt").read_text()).ids
    prompts = [(text_ids * (p // len(text_ids) + 1))[:p] for p in args.prompt_tokens]
    systems, failed = prepare(model_label, hf, args)
    scores = quality(systems, hf, text_ids[: args.quality_tokens], args.threads, args.work) if real_weights else {}
    rounds = []
    count = progress.Count(f"{model}: timing {len(systems)} systems x {args.rounds} rounds", len(systems) * args.rounds)
    for i in range(args.rounds):
        print(f"  timing round {i + 1}/{args.rounds}", flush=True)
        rows = []
        for s in systems:
            try:
                rows += s.bench(prompts, args)
            except Exception as e:  # noqa: BLE001 - one system's crash is its row's error, not the sitting's end
                rows += [BenchResult(system=s.name, model=model_label, runtime=s.family, prompt_tokens=len(p), error=str(e),
                                     machine=describe(), timestamp=now()) for p in prompts]
            count.step()
        rounds.append(rows)
    rows = median_rounds(rounds)
    by_name = {s.name: s for s in systems}
    for r in rows:
        s = by_name[r.system]
        r.export_s, r.export_peak_rss_mb = s.info["export_s"], s.info["export_peak_rss_mb"]
        r.artifact_mb = s.info["artifact_mb"]
        kl, top1, err = scores.get(s.name, (None, None, None))
        r.mean_kl, r.top1_agreement = kl, top1
        if err:
            r.samples["quality_error"] = err
    return rows + failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(models.MODELS),
                    help=f"comma list from {', '.join(models.MODELS)}, or paths of your own Hugging Face folders")
    ap.add_argument("--targets", type=lambda s: s.split(","), default=["onnx", "executorch"])
    ap.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[16, 8, 4])
    ap.add_argument("--executorch-kv16", type=lambda s: [int(x) for x in s.split(",")] if s else [], default=[4],
                    help="bit widths at which ExecuTorch is also exported with --kv-bits 16 (fp16 KV cache); empty for none")
    ap.add_argument("--onnx-kv8", type=lambda s: [int(x) for x in s.split(",")] if s else [], default=[4],
                    help="bit widths at which ONNX is also exported with --kv-bits 8 (int8 KV cache); empty for none")
    ap.add_argument("--onnx-head8", type=lambda s: [int(x) for x in s.split(",")] if s else [], default=[],
                    help="bit widths at which ONNX is also exported with --lm-head-bits 8 --kv-bits 8 (an int8 "
                         "output layer; ONNX's int4 default has one already); empty for none (default)")
    ap.add_argument("--executorch-fp16", action=argparse.BooleanOptionalAction, default=True,
                    help="also export ExecuTorch as an fp16 program (--bits 16 --compute-precision float16)")
    ap.add_argument("--peers", type=lambda s: s.split(",") if s else [], default=list(PEERS),
                    help=f"comma list from {', '.join(PEERS)}; empty for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[32, 512])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--quality-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds over all systems; the median is reported")
    ap.add_argument("--out", type=Path, default=HERE, help="where results.json, RESULTS.md and plots/ go")
    ap.add_argument("--work", type=Path, default=HERE / ".cache", help="models, artifacts and logits (reused)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    unknown = [p for p in args.peers if p not in PEERS] + [m for m in args.models if m not in models.MODELS
                                                            and not (Path(m) / "config.json").is_file()]
    if unknown:
        ap.error(f"unknown {', '.join(unknown)}; peers: {', '.join(PEERS)}; models: {', '.join(models.MODELS)}")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    command = " ".join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]])
    rows = []
    for i, m in enumerate(args.models):  # the report is rewritten after each model: a long sitting keeps what it has
        rows += run_model(m, args)
        done = "" if i == len(args.models) - 1 else f" (in progress: {i + 1} of {len(args.models)} models done)"
        report.write(args.out, rows, args, started=started, command=command, progress=done,
                     minutes=(time.perf_counter() - t0) / 60, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
