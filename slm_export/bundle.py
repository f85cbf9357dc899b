"""Hand-off: `bundle` (a self-describing folder, optionally zipped) and `inspect`.

A bundle is an artifact folder plus what an app developer needs: a README written for them, the
latest parity and bench results with the machine they came from (not its name, nor any local path),
one manifest whose sha256 table covers every file, and SHA256SUMS, the same sha256s for `sha256sum -c`.
Opening a zip extracts only the files its manifest lists into the cache, after refusing anything
that would land outside it (slm_export/archive.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from . import manifest as mf
from .errors import SlmExportError

REPORTS = "reports"
PARITY_FILE = f"{REPORTS}/parity.json"
BENCH_FILE = f"{REPORTS}/bench.json"


CHECK_SUMS = (f"\n## Checking the files\n\nIn this folder, `sha256sum -c {mf.SUMS}` (Linux) or `shasum -a 256 -c {mf.SUMS}` "
              "(macOS) checks every file against the sha256 it was bundled with; if one fails, download the bundle again.\n")


def save_report(folder: Path, name: str, data: dict) -> None:
    """Keep the latest verify/bench result beside the artifact (best effort: it may be read-only), without
    the machine's name or the folder's path: what the folder keeps is shared with it. A bundle keeps the
    results it was made with (its manifest and SHA256SUMS list them)."""
    if name in _listed(folder):
        return
    try:
        (Path(folder) / REPORTS).mkdir(exist_ok=True)
        (Path(folder) / name).write_text(json.dumps(_shareable(dict(data, saved=time.strftime("%Y-%m-%dT%H:%M:%S%z"))),
                                                    indent=1))
    except OSError:
        pass


def _listed(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / mf.MANIFEST).read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _shareable(report: dict) -> dict:
    """A verify or bench report without host names or addresses (the machine's, an SSH device's user@host:port),
    naming the artifact folder, not its path."""
    def device(name):
        url = urlsplit(name) if isinstance(name, str) else None
        return url.scheme if url and url.netloc else name  # ssh://user@host:port -> ssh

    def machine(m):
        if not isinstance(m, dict):
            return m
        return {k: device(v) if k == "name" else v for k, v in m.items() if k not in ("hostname", "address")}

    def row(r):
        return {k: machine(v) if k == "machine" else device(v) if k == "device" else v for k, v in r.items()}

    out = {k: machine(v) if k == "machine" else v for k, v in report.items()}
    if "artifact" in out:
        out["artifact"] = Path(out["artifact"]).name
    if "results" in out:
        out["results"] = [row(r) for r in out["results"]]
    return out


def _latest(folder: Path, name: str) -> dict | None:
    """The report kept in `folder` (as `_shareable` writes it: a folder verified by an older version had names)."""
    p = mf.inside(folder, name)
    return _shareable(json.loads(p.read_text())) if p.is_file() else None


def _without_paths(manifest: dict) -> dict:
    """`manifest` with the names of its source and calibration text where an older version recorded their paths."""
    out = dict(manifest)
    if out["source"].get("path"):
        src = out["source"]
        out["source"] = {**{k: v for k, v in src.items() if k != "path"}, "name": src.get("name") or Path(src["path"]).name}
    calibration = out["quant"].get("calibration") or {}
    if calibration.get("file"):
        out["quant"] = {**out["quant"], "calibration": {**calibration, "file": Path(calibration["file"]).name}}
    return out


def bundle(artifact, out: str | Path | None = None, make_zip: bool = False, force: bool = False) -> Path:
    """Write the bundle folder (and `<folder>.zip` with make_zip); returns the folder."""
    from .exporters import TARGETS
    from .staging import check_destination, share_modes, staged_file, staged_folder

    src = Path(artifact.path)
    out = Path(out or f"{src}-bundle").expanduser().absolute()
    if out == src:
        raise SlmExportError("--out must differ from the artifact folder")
    check_destination(out, force)
    with staged_folder(out, log=lambda s: print(s, file=sys.stderr)) as tmp:
        for name in artifact.manifest["files"]:
            if name.startswith(f"{REPORTS}/") or name == "README.md":
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(mf.inside(src, name), tmp / name)
        reports = {name: _latest(src, name) for name in (PARITY_FILE, BENCH_FILE)}
        for name, data in reports.items():
            if data is not None:
                (tmp / REPORTS).mkdir(exist_ok=True)
                (tmp / name).write_text(json.dumps(data, indent=1))
        manifest = _without_paths({k: v for k, v in artifact.manifest.items() if k not in ("files", "schema_version")})
        manifest["bundle"] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "parity": _summary_parity(reports[PARITY_FILE]),
                              "bench": _summary_bench(reports[BENCH_FILE])}
        (tmp / "README.md").write_text(TARGETS.get(artifact.target)().app_readme(manifest) + CHECK_SUMS)
        mf.write(tmp, manifest)
        if make_zip:  # zipped from the staged folder: a failed zip leaves neither the zip nor the folder
            share_modes(tmp)
            with staged_file(out.with_suffix(".zip")) as f:
                _write_zip(tmp, out.name, f)
    return out


def _write_zip(folder: Path, top: str, f) -> None:
    """Every file of `folder` into the open file `f`, under the folder name `top`."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, f"{top}/{p.relative_to(folder).as_posix()}")


def _summary_parity(data: dict | None) -> dict | None:
    if not data:
        return None
    return {"passed": data["passed"], "saved": data.get("saved"), "machine": data.get("machine"),
            "perplexity": data.get("perplexity"),
            "comparisons": [{k: c[k] for k in ("reference", "mean_kl", "top1_agreement", "max_abs_logit_diff", "passed")}
                            for c in data["comparisons"]]}


def _top1(c: dict) -> str:
    t = c.get("top1_agreement")  # None: no position where the reference's lead made top-1 meaningful
    return "n/a" if t is None else f"{t:.3f}"


def _summary_bench(data: dict | None) -> dict | None:
    if not data:
        return None
    keep = ("runtime", "prompt_tokens", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "threads", "error")
    rows = data.get("results", [])
    return {"saved": data.get("saved"), "machine": rows[0].get("machine") if rows else None,
            "results": [{k: r.get(k) for k in keep} for r in rows]}


def open_path(path: str | Path) -> Path:
    """A folder as is; a .zip checked and extracted into the cache (see slm_export/archive.py)."""
    path = Path(path).expanduser()
    if path.suffix != ".zip":
        return path
    from .archive import open_zip

    return open_zip(path)


def inspect(path: str | Path) -> dict:
    """What a bundle or artifact holds; a missing or changed file (or a SHA256SUMS that disagrees with the
    manifest) is refused, naming it."""
    folder = open_path(path)
    manifest = mf.read(folder)
    mf.check_files(folder, manifest)
    checksums = (f"ok: every file matches manifest.json and {mf.SUMS}" if (folder / mf.SUMS).is_file()
                 else f"ok: every file matches manifest.json (no {mf.SUMS}: exported before slm-export wrote one)")
    return {
        "path": str(folder), "target": manifest["target"], "runtime": manifest["runtime"],
        "architecture": manifest["architecture"], "source": manifest["source"], "quant": manifest["quant"]["label"],
        "quant_summary": manifest["quant"]["summary"], "model_mb": round(mf.model_size_bytes(manifest) / 1e6, 2),
        "files": len(manifest["files"]), "total_mb": round(sum(f["bytes"] for f in manifest["files"].values()) / 1e6, 2),
        "checksums": checksums, "max_context": manifest["max_context"], "io": manifest["io"],
        "app_runtimes": manifest.get("app_runtimes") or {},
        "parity": manifest.get("bundle", {}).get("parity") or _summary_parity(_latest(folder, PARITY_FILE)),
        "bench": manifest.get("bundle", {}).get("bench") or _summary_bench(_latest(folder, BENCH_FILE)),
    }


def _format_io(io: dict) -> list[str]:
    """Graph inputs/outputs (ONNX), each method's (ExecuTorch), or each function's with its state (Core ML)."""
    if "functions" in io:
        return [f"  function      {name}({', '.join(f['inputs'])}) -> {', '.join(f['outputs'])}; "
                f"state {', '.join(f['states'])}" for name, f in io["functions"].items()]
    if "methods" not in io:
        return [f"  inputs        {', '.join(io['inputs'])}", f"  outputs       {', '.join(io['outputs'])}"]
    return [f"  method        {name}({', '.join(m['inputs'])}) -> {', '.join(m['outputs'])}"
            for name, m in io["methods"].items()]


def format_inspect(info: dict) -> str:
    kv = info["io"]["kv_layout"]
    lines = [
        f"{info['path']}",
        f"  target        {info['target']} (runtime {info['runtime']}), {info['architecture']}, from {mf.source_label(info['source'])}",
        f"  quantization  {info['quant']}: {info['quant_summary']['stored_mb']} MB stored for {info['quant_summary']['weights']} weights, kept float: {info['quant_summary']['kept_float'] or 'none'}",
        f"  size          model {info['model_mb']} MB, {info['files']} files, {info['total_mb']} MB in all",
        f"  checksums     {info['checksums']}",
        *_format_io(info["io"]),
        f"  kv cache      {kv['layers']} layers x {kv['kv_heads']} kv heads x {kv['head_dim']} ({kv['dtype']}), max context {info['max_context']}",
    ]
    for runtime, app in info.get("app_runtimes", {}).items():
        lines.append(f"  also runs in  {app.get('tested_with', runtime)} ({app['config']})" if app.get("config")
                     else f"  not for       {runtime}: {app.get('why')}")
    p = info["parity"]
    if p:
        comp = "; ".join(f"{c['reference']}: KL {c['mean_kl']:.4f}, top-1 {_top1(c)} {'PASS' if c['passed'] else 'FAIL'}"
                         for c in p["comparisons"])
        lines.append(f"  last parity   {'PASS' if p['passed'] else 'FAIL'} ({comp}) on {p.get('saved')}")
    else:
        lines.append("  last parity   none recorded (run `slm-export verify`)")
    b = info["bench"]
    if b and b["results"]:
        m = b.get("machine") or {}
        several = len({r.get("runtime") for r in b["results"]}) > 1  # `bench --runtime all`: name each row's runtime
        runs = "; ".join((f"{r.get('runtime')} " if several else "") + (
            f"prompt {r['prompt_tokens']}: TTFT {r['ttft_ms']:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB"
            if not r.get("error") else f"prompt {r['prompt_tokens']}: FAILED {r['error']}") for r in b["results"])
        lines.append(f"  last bench    {runs} ({m.get('cpu')}, {m.get('cores')} cores, {b['results'][0].get('threads')} threads) on {b.get('saved')}")
    else:
        lines.append("  last bench    none recorded (run `slm-export bench`)")
    return "\n".join(lines)
