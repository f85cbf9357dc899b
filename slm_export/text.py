"""Tokenizer and chat template without transformers or torch, so runners stay light on devices."""
from __future__ import annotations

from pathlib import Path

from .errors import SlmExportError


def passage_text() -> str:
    """The English passage shipped for parity, perplexity, benchmark prompts and calibration."""
    from importlib import resources

    return resources.files("slm_export").joinpath("data/passage.txt").read_text()


def passage_ids(codec) -> list[int]:
    """Token ids of the shipped passage."""
    return codec.encode(passage_text())


class TextCodec:
    def __init__(self, folder: Path, manifest: dict):
        info = manifest.get("tokenizer", {})
        if not info.get("present"):
            raise SlmExportError(
                f"{folder} has no tokenizer (it was exported without one), and turning text into tokens needs one; "
                "re-export from a model with its tokenizer files, without --no-tokenizer (Python API: tokenizer=...)"
            )
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(folder) / info["file"]))
        self.chat_template = info.get("chat_template")
        self.bos_token, self.eos_token = info.get("bos_token"), info.get("eos_token")
        self.eos_ids = set(info.get("eos_token_ids", []))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_chat(self, user_message: str) -> list[int]:
        """The prompt as the model was trained to see it (its chat template), or the raw text."""
        if not self.chat_template:
            return self.encode(user_message)
        text = format_chat(self.chat_template, user_message, self.bos_token, self.eos_token)
        # Like transformers' apply_chat_template: the template already holds the special tokens.
        return self.encode(text, add_special_tokens=False)


def format_chat(chat_template: str, user_message: str, bos_token: str | None = None,
                eos_token: str | None = None) -> str:
    """One user message rendered with the model's chat template, ready for the assistant's answer.

    The template comes with the model (a hub repository, a bundle someone sent): it renders in jinja2's
    immutable sandbox, as transformers renders it, so it can read its inputs and nothing else."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):  # what transformers gives templates to refuse a conversation with
        raise jinja2.exceptions.TemplateError(message)

    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: __import__("datetime").datetime.now().strftime(fmt))
    try:
        return env.from_string(chat_template).render(messages=[{"role": "user", "content": user_message}],
                                                     add_generation_prompt=True, bos_token=bos_token or "",
                                                     eos_token=eos_token or "")
    except jinja2.exceptions.SecurityError as e:
        raise SlmExportError(f"the model's chat template tried something a template may not ({e}); "
                             "use --raw, or fix chat_template in its tokenizer_config.json") from None
    except jinja2.exceptions.TemplateError as e:
        raise SlmExportError(f"the model's chat template does not render ({type(e).__name__}: {e}); "
                             "use --raw, or fix chat_template in its tokenizer_config.json") from None
