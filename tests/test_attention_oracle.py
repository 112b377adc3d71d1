"""Softmax attention (a `cache` level) against PyTorch's own scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nestc
from nestc.backends import attention
from nestc.backends.state import LevelState

SPEC = """
level attn : cache(window={window}) {{
    read {read}
}}
model {{
    vocab 5
    dim 12
    heads 3
    block = residual(attn)
}}
"""


def _expected(level, x: torch.Tensor, window: int, read: str) -> torch.Tensor:
    batch, length, _ = x.shape
    k, v, q = (level.pipelines[r].stages[0].linear(x).reshape(batch, length, 3, -1).transpose(1, 2)
               for r in ("key", "value", "query"))
    rows = torch.arange(length)[:, None]
    columns = torch.arange(length)[None, :]
    newest = rows if read == "after" else rows - 1
    allowed = columns <= newest
    if window:
        allowed &= columns > newest - window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = torch.where(allowed.any(-1)[None, None, :, None], out, torch.zeros_like(out))  # nothing to read: zero
    return level.out(out.transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("read", ["after", "before"])
def test_cache_level_is_causal_softmax_attention(window, read):
    torch.manual_seed(0)
    model = nestc.load(SPEC.format(window=window, read=read))
    level = model.layers[0].levels["attn"]
    x = torch.randn(2, 11, 12)
    expected = _expected(level, x, window, read)
    with torch.no_grad():
        state = LevelState()
        token_by_token = torch.stack([level.step(x[:, t], t, state, None) for t in range(11)], dim=1)
        first = attention.attend_segment(level, x[:, :4], 0, (segment_state := LevelState()), None)
        rest = attention.attend_segment(level, x[:, 4:], 4, segment_state, None)
    torch.testing.assert_close(token_by_token, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, rtol=1e-5, atol=1e-6)
