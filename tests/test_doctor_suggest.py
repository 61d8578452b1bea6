"""Templates suggested to a model without one: only those whose special tokens its vocabulary
has (and has trained). Gemma 4's own vocabulary gets ``gemma-4``, never ChatML or Llama 3."""

from __future__ import annotations

from tunefix import tiny
from tunefix.doctor import examine


def test_a_gemma4_base_model_is_offered_its_own_template():
    finding = examine(tiny.tiny_model("gemma4")).get("missing-chat-template")
    assert finding is not None
    suggested = finding.evidence["suggested"]
    assert "gemma-4" in suggested and "alpaca" in suggested
    assert not {"chatml", "llama-3", "gpt-oss", "gemma"} & set(suggested)
