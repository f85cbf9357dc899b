"""A model written from scratch (no transformers), exported through the plain nn.Module contract.

The module below is an independent implementation of the contract's math, so parity against its
own forward checks the exporter against code that shares nothing with transformers.
"""
import math

import pytest
import torch
from torch import nn

import slm_export
from slm_export import SlmExportError

CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
              max_position_embeddings=128)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.1 * torch.randn(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, theta):  # x: [b, heads, seq, d], rotate-half layout
    d, seq = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.outer(torch.arange(seq).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]
        self.q_proj = nn.Linear(c["hidden_size"], self.h * self.d, bias=False)
        self.k_proj = nn.Linear(c["hidden_size"], self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(c["hidden_size"], self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c["hidden_size"], bias=False)
        self.theta = c["rope_theta"]

    def forward(self, x):
        b, s, _ = x.shape
        q = rope(self.q_proj(x).view(b, s, self.h, self.d).transpose(1, 2), self.theta)
        k = rope(self.k_proj(x).view(b, s, self.kv, self.d).transpose(1, 2), self.theta)
        v = self.v_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)
        k, v = (t.repeat_interleave(self.h // self.kv, dim=1) for t in (k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
        att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], c["hidden_size"], bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class MyLM(nn.Module):
    """What a user might train with their own code."""

    def __init__(self, c=CONFIG):
        super().__init__()
        self.config = dict(c)
        self.model = Inner(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x)
        return self.lm_head(self.model.norm(x))


@pytest.mark.parametrize("bits", [16, 4])
def test_own_module_exports_and_matches_its_own_forward(bits, tmp_path):
    torch.manual_seed(0)
    model = MyLM().eval()
    art = slm_export.export(model, bits=bits, out=tmp_path / "mine", log=lambda *a: None)
    assert art.manifest["source"] == {"kind": "object", "name": "MyLM"}
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=12, perplexity=False)
    assert report.passed, report.format()
    if bits == 16:
        assert report.comparisons[0].max_abs_logit_diff < 1e-3


def test_module_breaking_the_contract_is_refused(tmp_path):
    model = MyLM()
    model.config.pop("rope_theta")
    with pytest.raises(SlmExportError, match="config lacks rope_theta"):
        slm_export.export(model, out=tmp_path / "a", log=lambda *a: None)
    model = MyLM()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(SlmExportError, match="does not follow the Llama parameter layout \\(unexpected extra\\."):
        slm_export.export(model, out=tmp_path / "b", log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_module_with_different_math_fails_parity(tmp_path):
    """If the module's forward is not the contract's math, verify says so (it is not silently exported)."""
    torch.manual_seed(0)
    model = MyLM().eval()
    art = slm_export.export(model, bits=16, out=tmp_path / "a", log=lambda *a: None)
    for block in model.model.layers:
        block.self_attn.theta = 500.0  # a different rope base than the config says
    report = art.verify(reference=model, prompt_tokens=40, decode_steps=4, perplexity=False)
    assert not report.passed
