"""Gemma 2 trains with the attention that applies its logit soft cap."""

from __future__ import annotations

import torch
import transformers

from alphalora.training.model import load_base
from tests.tiny_models import build, save_tiny


def test_gemma2_loads_with_the_attention_that_applies_its_soft_cap(tmp_path, monkeypatch):
    """transformers 5.17 declared sdpa for Gemma 2 (its default then), which left the attention soft cap out (newer
    ones refuse sdpa with a cap); that declaration is simulated here. The model training loads must compute what
    Gemma 2's eager attention computes."""
    monkeypatch.setattr(transformers.Gemma2PreTrainedModel, "_supports_sdpa", True)
    caps = dict(attn_logit_softcapping=1.0, initializer_range=0.5)  # small enough a cap to change the logits
    folder = save_tiny("gemma2", tmp_path / "gemma2", **caps)
    model, _ = load_base(folder, "causal-lm", None, torch.float32)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.eval()(ids).logits
        want = build("gemma2", **caps)(ids).logits  # (tests.tiny_models builds Gemma 2 with eager attention)
        uncapped = build("gemma2", **{**caps, "attn_logit_softcapping": None})(ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(uncapped, want, atol=1e-3)  # the cap matters for this model
