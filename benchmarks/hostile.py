"""Hostile inputs, at full size: every one refused in one line with exit 2, under 10 s and 1 GB, no debris.

    .venv/bin/python benchmarks/hostile.py          # writes benchmarks/hostile/{results.json,HOSTILE.md,hostile.png}

Each case is built here from a real bundle (a tiny model exported to ONNX and zipped by `slm-export bundle
--zip`) or a real model folder, with one hostile change, and run as the command a user types (one process,
`python -m slm_export.cli ...`). Measured per case: exit status, stderr, wall time and the child's peak RSS
(ru_maxrss from wait4; the CLI imports torch, so that is the floor). Then, what it left: anything written
beside the output folder or outside the run's scratch folder, bytes left in the slm-export cache, and
whether a pickle's payload ran. A case passes when it exits 2 with exactly one line naming the input,
in under 10 s, under 1 GB, leaving nothing. The zip bombs are the sizes a skeptical user tried: a
1 GiB file of zeros deflated to about 1 MB, unlisted or listed under a small size.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # slm_export.manifest (rezip writes a SHA256SUMS that matches a changed manifest)
OUT = HERE / "hostile"
CLI = [sys.executable, "-m", "slm_export.cli"]
BOMB = 1 << 30  # bytes of zeros in a zip-bomb entry
LIMIT_S, LIMIT_MB = 10.0, 1024.0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_measured(args: list, env: dict, cwd: Path) -> dict:
    """Run the CLI once; wall seconds and the child's peak RSS (MiB) from wait4."""
    t = time.perf_counter()
    p = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"code": p.returncode, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


# ------------------------------------------------------------------------------------------------ builders
def tiny_folder(path: Path) -> Path:
    """A real Hugging Face folder of a tiny Llama (safetensors, tokenizer with a chat template)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return path


def rezip(good: Path, path: Path, *, manifest_change=None, extra=(), rename=None, change=None) -> Path:
    """A copy of the bundle zip `good` with its manifest changed (and its SHA256SUMS written to match, as
    anyone who edits a manifest can), entries renamed or changed, or `extra` entries added.

    extra: (name, bytes or an int = that many zeros, streamed). change: {name under TOP: bytes -> bytes}."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        top = src.namelist()[0].split("/")[0]
        changed = {}
        if manifest_change:
            from slm_export.manifest import sums_text

            m = json.loads(src.read(f"{top}/manifest.json"))
            manifest_change(m, top)
            changed[f"{top}/manifest.json"] = json.dumps(m, indent=1).encode()
            changed[f"{top}/SHA256SUMS"] = sums_text(m, hashlib.sha256(changed[f"{top}/manifest.json"]).hexdigest()).encode()
        for info in src.infolist():
            name = info.filename
            data = changed.get(name) or src.read(info)
            data = (change or {}).get(name.replace(top, "TOP", 1), lambda d: d)(data)
            dst.writestr((rename or {}).get(name, name), data)
        for name, data in extra:
            name = name.replace("TOP", top)
            if isinstance(data, int):
                with dst.open(name, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 20)
                    for _ in range(data >> 20):
                        f.write(chunk)
            else:
                dst.writestr(name, data)
    return path


def symlink_zip(good: Path, path: Path) -> Path:
    shutil.copy(good, path)
    with zipfile.ZipFile(path, "a") as z:
        top = z.namelist()[0].split("/")[0]
        info = zipfile.ZipInfo(f"{top}/link")
        info.external_attr = 0o120777 << 16  # a symbolic link to the user's ssh keys
        z.writestr(info, "/root/.ssh")
    return path


def listed_bomb(m: dict, top: str) -> None:
    m["files"]["zeros.bin"] = {"bytes": 100, "sha256": hashlib.sha256(b"0" * 100).hexdigest()}


def escaping_manifest(m: dict, top: str) -> None:
    data = b"written outside\n"
    m["files"]["../NAME.txt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])  # the same size: only its sha256 tells


def make(what: str, where: Path, env: dict | None = None) -> Path:
    """Run a builder that needs torch in a child process (see main)."""
    subprocess.run([sys.executable, __file__, "--make", what, str(where)], check=True, env={**os.environ, **(env or {})})
    return where


class Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def pickle_bin(path: Path, sentinel: Path) -> None:
    import torch

    torch.save({"model.embed_tokens.weight": Payload(sentinel)}, path / "pytorch_model.bin")


def pickle_folder(good_folder: Path, path: Path, sentinel: Path) -> Path:
    """The tiny folder with its weights as a pickle (pytorch_model.bin) whose unpickling runs a command."""
    shutil.copytree(good_folder, path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    return make("pickle", path, {"SENTINEL": str(sentinel)})


def bad_safetensors(good_folder: Path, path: Path, header_len: int) -> Path:
    shutil.copytree(good_folder, path)
    for f in path.glob("*.safetensors"):
        f.write_bytes(struct.pack("<Q", header_len) + b'{"a": 1}' + bytes(1000))
    return path


def bad_gguf(path: Path, n_tensors: int, n_kv: int, key_len: int | None = None) -> Path:
    body = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)
    if key_len is not None:
        body += struct.pack("<Q", key_len) + b"general.architecture"
    path.write_bytes(body + bytes(4096))
    return path


def remote_code_folder(good_folder: Path, path: Path) -> Path:
    shutil.copytree(good_folder, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="evil", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/slm-export-remote-code-ran')\n")
    return path


# ------------------------------------------------------------------------------------------------ the run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="folder for results.json, HOSTILE.md, hostile.png (default: %(default)s)")
    ap.add_argument("--make", nargs=2, metavar=("WHAT", "DIR"), help=argparse.SUPPRESS)  # internal: a builder that needs torch
    args = ap.parse_args()
    if args.make:  # run in a child: this process imports no torch, since a forked child's ru_maxrss starts at ours
        what, where = args.make
        tiny_folder(Path(where)) if what == "tiny" else pickle_bin(Path(where), Path(os.environ["SENTINEL"]))
        return

    scratch = Path(tempfile.mkdtemp(prefix="slm-hostile-"))
    cache = scratch / "cache"
    env = {**os.environ, "SLM_EXPORT_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        folder = make("tiny", scratch / "tiny")
        made = run_measured(["--model", folder, "--target", "onnx", "--bits", "4", "--max-context", "64",
                             "--out", scratch / "art"], env, scratch)
        assert made["code"] == 0, made["stderr"]
        made = run_measured(["bundle", scratch / "art", "--zip", "--out", scratch / "good"], env, scratch)
        assert made["code"] == 0, made["stderr"]
        good = next(scratch.glob("good*.zip"))
        cases = build_cases(scratch, good, folder)
        rows = []
        for name, argv, sentinel in cases:
            victim = scratch / "victim"
            victim.mkdir(exist_ok=True)
            before = {p for p in scratch.rglob("*")}
            shutil.rmtree(cache, ignore_errors=True)
            r = run_measured(argv, env, scratch)
            after = {p for p in scratch.rglob("*")}
            new = sorted(str(p.relative_to(scratch)) for p in after - before if cache not in p.parents and p != cache)
            lines = [l for l in r["stderr"].strip().splitlines() if l.strip()]
            debris = tree_bytes(cache / "unzipped") if (cache / "unzipped").exists() else 0
            ran = sentinel is not None and sentinel.exists()
            ok = (r["code"] == 2 and len(lines) == 1 and r["seconds"] < LIMIT_S and r["peak_rss_mb"] < LIMIT_MB
                  and not new and not debris and not ran)
            rows.append({"case": name, "command": "slm-export " + " ".join(str(a).replace(str(scratch), "$T") for a in argv),
                         "exit": r["code"], "message": lines[-1] if lines else "", "stderr_lines": len(lines),
                         "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "written_outside": new,
                         "cache_bytes_left": debris, "payload_ran": ran, "passed": ok})
            print(f"{'PASS' if ok else 'FAIL'} {name}: exit {r['code']} {r['seconds']:.1f}s {r['peak_rss_mb']:.0f} MiB"
                  f"  {lines[-1][:110] if lines else ''}", flush=True)
            shutil.rmtree(victim, ignore_errors=True)
        write(args.out, rows, good.stat().st_size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_cases(t: Path, good: Path, folder: Path) -> list[tuple[str, list, Path | None]]:
    bomb = t / "bomb.zip"
    rezip(good, bomb, extra=[("TOP/zeros.bin", BOMB)])
    sentinel = t / "pickle-payload-ran"
    return [
        ("manifest lists ../NAME.txt (bundle --out victim/handoff)",
         ["bundle", rezip(good, t / "escape.zip", manifest_change=escaping_manifest), "--out", t / "victim" / "handoff"], None),
        ("unlisted 1 GiB of zeros (inspect)", ["inspect", bomb], None),
        ("1 GiB of zeros listed as 100 bytes (inspect)",
         ["inspect", rezip(good, t / "listed.zip", manifest_change=listed_bomb, extra=[("TOP/zeros.bin", BOMB)])], None),
        ("a file whose sha256 differs (inspect)",
         ["inspect", rezip(good, t / "sum.zip", change={"TOP/tokenizer.json": flip_last_byte})], None),
        ("SHA256SUMS that disagrees with the manifest (inspect)",
         ["inspect", rezip(good, t / "sums.zip", change={"TOP/SHA256SUMS": lambda d: b"0" * 64 + d[64:]})], None),
        ("unlisted run.sh (inspect)", ["inspect", rezip(good, t / "sh.zip", extra=[("TOP/run.sh", b"#!/bin/sh\nrm -rf ~\n")])], None),
        ("entry ../evil (inspect)", ["inspect", rezip(good, t / "dots.zip", extra=[("TOP/../evil", b"x")])], None),
        ("entry /tmp/evil (inspect)", ["inspect", rezip(good, t / "abs.zip", extra=[("/tmp/evil", b"x")])], None),
        ("entry that is a symlink (inspect)", ["inspect", symlink_zip(good, t / "link.zip")], None),
        ("pickle weights with a payload (export)",
         ["--model", pickle_folder(folder, t / "pickle", sentinel), "--out", t / "o1"], sentinel),
        ("safetensors header length 2^62 (export)",
         ["--model", bad_safetensors(folder, t / "st1", 1 << 62), "--out", t / "o2"], None),
        ("safetensors header length 100 MB in a 1 KB file (export)",
         ["--model", bad_safetensors(folder, t / "st2", 100 << 20), "--out", t / "o3"], None),
        ("GGUF claiming 2^62 tensors (export)", ["--model", bad_gguf(t / "a.gguf", 1 << 62, 0), "--out", t / "o4"], None),
        ("GGUF claiming 2^62 metadata keys (export)", ["--model", bad_gguf(t / "b.gguf", 0, 1 << 62), "--out", t / "o5"], None),
        ("GGUF key of length 2^60 (export)", ["--model", bad_gguf(t / "c.gguf", 0, 1, key_len=1 << 60), "--out", t / "o6"], None),
        ("remote code without --trust-remote-code (export)",
         ["--model", remote_code_folder(folder, t / "remote"), "--out", t / "o7"], Path("/tmp/slm-export-remote-code-ran")),
    ]


def write(out: Path, rows: list[dict], good_zip_bytes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    import importlib.metadata as md

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "slm_export": md.version("slm-export") if _installed() else "source",
            "limits": {"seconds": LIMIT_S, "peak_rss_mb": LIMIT_MB}, "bomb_bytes": BOMB, "good_zip_bytes": good_zip_bytes}
    (out / "results.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
    lines = ["# Hostile inputs: refused in one line, bounded time and memory, no debris", "",
             f"Written by `benchmarks/hostile.py` on {meta['date']}, {meta['cpu']}, {meta['cores']} cores, Python "
             f"{meta['python']}. Each case is one CLI process; peak RSS is its ru_maxrss (MiB; importing torch is most "
             f"of it). Pass: exit 2, one stderr line, < {LIMIT_S:g} s, < {LIMIT_MB:g} MiB, nothing written outside "
             "the output folder, nothing left in the cache, no payload run. `$T` is the run's scratch folder.", "",
             "| case | exit | s | peak MiB | left behind | result | message |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        left = ", ".join(r["written_outside"]) or (f"{r['cache_bytes_left']} B in cache" if r["cache_bytes_left"] else "nothing")
        if r["payload_ran"]:
            left += "; PAYLOAD RAN"
        msg = r["message"].replace("|", "\\|").replace(str(Path.home()), "~")
        lines.append(f"| {r['case']} | {r['exit']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {left} | "
                     f"{'PASS' if r['passed'] else 'FAIL'} | {msg} |")
    lines += ["", f"{sum(r['passed'] for r in rows)} of {len(rows)} cases pass."]
    (out / "HOSTILE.md").write_text("\n".join(lines) + "\n")
    plot(out)


def _installed() -> bool:
    import importlib.metadata as md
    try:
        md.version("slm-export")
        return True
    except md.PackageNotFoundError:
        return False


PLOT = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
rows, meta = data["cases"], data["meta"]
names = [r["case"] for r in rows][::-1]
fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 1.6), sharey=True)
for ax, key, limit, label in ((axes[0], "seconds", meta["limits"]["seconds"], "wall seconds"),
                              (axes[1], "peak_rss_mb", meta["limits"]["peak_rss_mb"], "peak RSS (MiB)")):
    ax.barh(names, [r[key] for r in rows][::-1], color=["tab:green" if r["passed"] else "tab:red" for r in rows][::-1])
    ax.axvline(limit, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"{label} (dashed: goal {limit:g})")
fig.suptitle(f"slm-export on hostile inputs ({meta['cpu']}, {meta['cores']} cores, {meta['date']}); green = refused cleanly",
             fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def plot(out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from peers.common import PeerError, ensure_venv

    try:
        py = ensure_venv("plots", [["matplotlib"]], check="import matplotlib")
        subprocess.run([str(py), "-c", PLOT, str(out / "results.json"), str(out / "hostile.png")],
                       check=True, capture_output=True, text=True)
    except (PeerError, subprocess.CalledProcessError) as e:
        print(f"plot not drawn: {e}")


if __name__ == "__main__":
    main()
