"""Proof that a GGUF export behaves like the PyTorch model: tokens, logits, stopping.

llama.cpp (through llama-cpp-python, the pinned version) is the judge. Each check
returns a small result; a failing one carries the first divergence (token and text),
and ``raise_if_failed`` turns it into a one-line ``TunefixError``.

One BOS, as decided in design.md: a rendered prompt that already starts with the BOS
text is tokenised without adding special tokens on both sides (the Hugging Face
``add_special_tokens=False``, llama.cpp ``add_bos=False``); any other text gets the
tokenizer's own policy on both sides (the Hugging Face tokenizer's post-processor, the
GGUF's ``add_bos_token``), so a wrong ``add_bos_token`` shows up as a divergence.
llama.cpp's own double-BOS warning is captured from its log on every tokenisation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunefix.errors import TunefixError
from tunefix.llamacpp import LlamaProcess

DOUBLE_BOS_WARNING = "the final prompt starts with 2 BOS tokens"

CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France? Answer in one word."},),
    ({"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}),
    ({"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Translate 'thank you' into French, please."}),
    ({"role": "user", "content": "  Leading spaces, digits 1234567890, emoji 🤗🎉 and 中文字符."},),
)
TRICKY = (
    "Hello world", " leading space", "  two leading spaces", "trailing space ",
    "digits 1234567890 3.14159 -42 2024-06-01", "emoji 🤗🎉👍🏽 end", "中文测试 日本語のテキスト 한국어",
    "tabs\tand\nnew lines\n\n", "MiXeD cAsE and CamelCase", "a",
)


# ---------------------------------------------------------------------- llama.cpp


@contextlib.contextmanager
def open_llama(gguf_file: str | os.PathLike, *, vocab_only: bool = False, n_ctx: int = 512,
               threads: int | None = None, lora_path: str | os.PathLike | None = None
               ) -> Iterator[LlamaProcess]:
    """A llama.cpp model (all logits kept) in a child process, ended when the block ends.

    ``threads=None`` keeps llama-cpp-python's default (half the cores). Measured on a
    busy 2-core machine: one thread evaluated SmolLM2 10 to 30 times faster than two,
    because ggml's threads spin on each other when the cores are shared.
    """
    if not Path(gguf_file).is_file():
        raise TunefixError(f"no GGUF file at {gguf_file}")
    kw: dict = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    if lora_path is not None:
        kw["lora_path"] = str(lora_path)
    with LlamaProcess(gguf_file, vocab_only=vocab_only, n_ctx=n_ctx, logits_all=not vocab_only, **kw) as llm:
        yield llm


# ------------------------------------------------------------------------ prompts


def load_tokenizer(hf_dir: str | os.PathLike):
    from tunefix.export.gguf_meta import load_tokenizer as load

    return load(hf_dir)


def chat_template(tok):
    """The template verification renders with: the one the model directory carries, as tunefix
    trains and serves it; bare Jinja when tunefix cannot use it (a model's own that ends turns
    with no token); ChatML for a tokenizer without one (special-looking text, whether or not
    the vocabulary has these tokens)."""
    from tunefix.export.gguf_meta import template_of
    from tunefix.templates import REGISTRY

    if not isinstance(tok.chat_template, str) or not tok.chat_template:
        return REGISTRY["chatml"]
    return template_of(tok) or tok.chat_template


def _system_optional(fn, messages: Sequence[dict[str, str]]):
    """``fn(messages)``, or ``fn`` of the messages without the system message when the template
    refuses one (the conversations here are generic; some families have no system turn)."""
    try:
        return fn(list(messages))
    except TunefixError as e:
        if messages and messages[0]["role"] == "system":
            return _system_optional(fn, messages[1:])
        raise TunefixError(f"the chat template failed to render a conversation: {e}") from e


def render(tok, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, template=None) -> str:
    """A conversation as the policy renders it (the strict sandbox; never apply_chat_template)."""
    from tunefix.templates import policy

    template = template or chat_template(tok)
    return _system_optional(lambda m: policy.render(tok, template, m, add_generation_prompt=add_generation_prompt),
                            messages)


def starts_with_bos(tok, text: str) -> bool:
    return bool(tok.bos_token) and text.startswith(tok.bos_token)


def hf_ids(tok, text: str) -> list[int]:
    """Token ids on tunefix's Hugging Face path: one BOS, from the text or the tokenizer."""
    return tok(text, add_special_tokens=not starts_with_bos(tok, text))["input_ids"]


def llama_ids(llm: LlamaProcess, tok, texts: Sequence[str]) -> list[list[int]]:
    """The same texts through llama.cpp, with the same BOS rule (one round trip)."""
    return llm.call("tokenize", [(text, not starts_with_bos(tok, text)) for text in texts])


def parity_texts(tok) -> list[tuple[str, str]]:
    """(label, text): rendered conversations, tricky strings and special-token strings."""
    template = chat_template(tok)
    texts = [(f"conversation {i}", render(tok, c, add_generation_prompt=i % 2 == 0, template=template))
             for i, c in enumerate(CONVERSATIONS)]
    texts += [(f"string {s!r}", s) for s in TRICKY]
    specials = [t for t in dict.fromkeys([tok.bos_token, tok.eos_token, *tok.all_special_tokens]) if t]
    texts += [(f"special {t!r}", f"before{t} after {t}") for t in specials[:8]]
    return texts


def prompt_ids(tok, template=None) -> list[list[int]]:
    """The conversations' inference prompts, exactly as training, evaluation and chat
    tokenise them (``policy.prompt_ids``: one BOS, no special tokens added)."""
    from tunefix.templates import policy

    template = template or chat_template(tok)
    return [_system_optional(lambda m: policy.prompt_ids(tok, template, m), c) for c in CONVERSATIONS]


# ------------------------------------------------------------------- tokenisation


@dataclass
class TokenParity:
    checked: int
    failures: list[str] = field(default_factory=list)
    double_bos: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.double_bos

    def raise_if_failed(self) -> None:
        if self.double_bos:
            raise TunefixError("llama.cpp put two BOS tokens in front of a rendered prompt",
                               "Fix the GGUF's add_bos_token or the template's BOS")
        if self.failures:
            raise TunefixError(f"tokenisation differs between llama.cpp and Hugging Face: {self.failures[0]}",
                               f"{len(self.failures)} of {self.checked} texts differ")


def _piece(tok, i: int | None) -> str:
    return "end" if i is None else f"{i} {tok.convert_ids_to_tokens(i)!r}"


def first_divergence(tok, text: str, ours: list[int], theirs: list[int]) -> str | None:
    """Where two id lists first part: the token index, both tokens and the text there."""
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
             None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
    if n is None:
        return None
    at = len(tok.decode(ours[:n], skip_special_tokens=False))
    a = ours[n] if n < len(ours) else None
    b = theirs[n] if n < len(theirs) else None
    return (f"token {n} (near character {at}, {text[max(0, at - 8):at + 8]!r}): "
            f"Hugging Face {_piece(tok, a)}, llama.cpp {_piece(tok, b)}")


def token_parity(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike, tok=None) -> TokenParity:
    """Tokenise the parity texts with llama.cpp (vocab only) and the Hugging Face tokenizer."""
    tok = tok or load_tokenizer(hf_dir)
    texts = parity_texts(tok)
    with open_llama(gguf_file, vocab_only=True) as llm:
        result = _token_parity(llm, tok, texts)
        logs = llm.call("logs")
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    if _bos_doubling_risk(tok, texts, add_bos):
        result.notes.append("the chat template writes BOS and the GGUF adds one: tokenise "
                            "rendered prompts with add_bos=False (llama.cpp's chat path does)")
    result.double_bos |= any(DOUBLE_BOS_WARNING in line for line in logs)
    return result


def _token_parity(llm: LlamaProcess, tok, texts: list[tuple[str, str]]) -> TokenParity:
    result = TokenParity(checked=len(texts))
    llama = llama_ids(llm, tok, [text for _, text in texts])
    for (label, text), theirs in zip(texts, llama, strict=True):
        ours = hf_ids(tok, text)
        where = first_divergence(tok, text, ours, theirs)
        if where:
            result.failures.append(f"{label}: {where}")
        bos = tok.bos_token_id
        if bos is not None and theirs[:2] == [bos, bos] and ours[:2] != [bos, bos]:
            result.double_bos = True
    return result


def _bos_doubling_risk(tok, texts: list[tuple[str, str]], gguf_adds_bos: bool) -> bool:
    # Not an error (design.md: official Llama 3 and Phi-3 templates do this), but a
    # caller that tokenises the rendered prompt with add_bos=True gets two BOS.
    rendered = [t for label, t in texts if label.startswith("conversation")]
    return any(starts_with_bos(tok, t) for t in rendered) and gguf_adds_bos


# --------------------------------------------------------------------------- logits


@dataclass
class LogitsParity:
    file: str
    positions: int
    compared: int          # positions where PyTorch's top-1 margin is at least min_margin
    top1_agreement: float  # over the compared positions
    max_abs_diff: float    # over all positions and the shared vocabulary
    first_disagreement: str | None
    max_abs_allowed: float | None  # None: reported, not judged (quantised files)

    @property
    def ok(self) -> bool:
        if self.max_abs_allowed is None:
            return True
        return self.top1_agreement == 1.0 and self.max_abs_diff <= self.max_abs_allowed

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise TunefixError(
                f"{self.file}: logits differ from PyTorch (top-1 agreement {self.top1_agreement:.1%}, "
                f"max abs diff {self.max_abs_diff:.3f}); first: {self.first_disagreement or 'none'}",
                "Check the converter's output for this architecture")


def load_reference(hf_dir: str | os.PathLike):
    """The PyTorch model in fp32 on the CPU, in eval mode: the reference of every check."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunefix.model.files import quiet_loading

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.eval()


def torch_logits(model, ids: Sequence[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()  # [T, V]


def llama_logits(llm: LlamaProcess, ids: Sequence[int]):
    return llm.call("logits", list(ids))  # [T, V]


def _compare(tok, ids, ref, got, min_margin: float):
    """(compared, agreed, max_abs, first disagreement) for one prompt's [T, V] logits."""
    import numpy as np

    v = min(ref.shape[1], got.shape[1])
    ref, got = ref[:, :v], got[:, :v]
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= min_margin
    ref_top, got_top = ref.argmax(1), got.argmax(1)
    bad = np.flatnonzero(clear & (ref_top != got_top))
    first = None
    if bad.size:
        p = int(bad[0])
        first = (f"position {p} after {tok.decode(ids[max(0, p - 4):p + 1])!r}: PyTorch "
                 f"{_piece(tok, int(ref_top[p]))}, llama.cpp {_piece(tok, int(got_top[p]))}")
    return int(clear.sum()), int(clear.sum() - bad.size), float(np.abs(ref - got).max()), first


def logits_parity(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike, *, model=None, tok=None,
                  prompts: Sequence[Sequence[int]] | None = None, min_margin: float = 0.0,
                  max_abs: float | None = 0.25, threads: int | None = None) -> LogitsParity:
    """Compare llama.cpp's logits with the fp32 PyTorch model's on the same token ids.

    ``min_margin`` leaves out positions where PyTorch's best two logits are closer than
    that (near-ties that any rounding may flip, common on random tiny models); the
    maximum absolute difference always covers every position. ``max_abs=None`` only
    reports (quantised files).
    """
    tok = tok or load_tokenizer(hf_dir)
    model = model if model is not None else load_reference(hf_dir)
    prompts = [list(p) for p in (prompts or prompt_ids(tok))]
    positions = compared = agreed = 0
    worst, first = 0.0, None
    # n_ctx sizes llama-cpp-python's [n_ctx, n_vocab] logits buffer: no larger than needed.
    with open_llama(gguf_file, n_ctx=max(map(len, prompts)) + 8, threads=threads) as llm:
        for ids in prompts:
            got = llama_logits(llm, ids)
            c, a, m, f = _compare(tok, ids, torch_logits(model, ids), got, min_margin)
            positions, compared, agreed = positions + len(ids), compared + c, agreed + a
            worst, first = max(worst, m), first or f
    return LogitsParity(Path(gguf_file).name, positions, compared,
                        agreed / compared if compared else 1.0, worst, first, max_abs)


# ---------------------------------------------------------------------------- stops


@dataclass
class StopRun:
    torch_tokens: list[int]
    llama_tokens: list[int]
    torch_stopped: bool
    llama_stopped: bool
    first_divergence: str | None


@dataclass
class StopParity:
    file: str
    max_new_tokens: int
    runs: list[StopRun]
    llama_only_stops: list[str]  # tokens llama.cpp stops on that the PyTorch side does not

    @property
    def ok(self) -> bool:
        return all(r.torch_stopped == r.llama_stopped for r in self.runs)

    def raise_if_failed(self) -> None:
        bad = [r for r in self.runs if r.torch_stopped != r.llama_stopped]
        if bad:
            r = bad[0]
            who = "PyTorch stops and llama.cpp does not" if r.torch_stopped else "llama.cpp stops and PyTorch does not"
            raise TunefixError(f"{self.file}: {who} within {self.max_new_tokens} tokens; "
                               f"first divergence: {r.first_divergence or 'none'}",
                               "Check the GGUF's eos/eot ids and the generation config")


def stop_ids(tok, template=None) -> set[int]:
    """The ids an answer ends on (``policy.stop_ids``): the template's end of turn and EOS."""
    from tunefix.export.gguf_meta import template_of
    from tunefix.templates import policy

    # The model's own template as tunefix serves it; None (EOS only) without one, or for one
    # that ends turns with no token: what the GGUF metadata names too.
    template = template if template is not None and not isinstance(template, str) else template_of(tok)
    return set(policy.stop_ids(tok, template))


def torch_greedy(model, ids: Sequence[int], stops: set[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(stops), pad_token_id=min(stops),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def llama_greedy(llm: LlamaProcess, ids: Sequence[int], eog: set[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by argmax of llama.cpp's logits, stopping on its own EOG set."""
    return llm.call("greedy", list(ids), sorted(eog), max_new_tokens)


def stop_parity(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike, *, model=None, tok=None,
                prompts: Sequence[Sequence[int]] | None = None,
                max_new_tokens: int = 64, threads: int | None = None) -> StopParity:
    """Greedy generation in both: does each stop with a stop token before the limit?"""
    tok = tok or load_tokenizer(hf_dir)
    model = model if model is not None else load_reference(hf_dir)
    prompts = [list(p) for p in (prompts or prompt_ids(tok)[:2])]
    stops = stop_ids(tok)
    runs = []
    with open_llama(gguf_file, n_ctx=max(map(len, prompts)) + max_new_tokens + 8, threads=threads) as llm:
        eog = llm.eog
        for ids in prompts:
            ours = torch_greedy(model, ids, stops, max_new_tokens)
            theirs = llama_greedy(llm, ids, eog, max_new_tokens)
            runs.append(StopRun(ours, theirs, bool(ours) and ours[-1] in stops,
                                bool(theirs) and theirs[-1] in eog,
                                first_divergence(tok, tok.decode(ours), ours, theirs)))
    extra = [f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in sorted(eog - stops)]
    return StopParity(Path(gguf_file).name, max_new_tokens, runs, extra)


# ------------------------------------------------------------------------- template


@dataclass
class TemplateParity:
    checked: int
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # conversations the Jinja template refuses

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_if_failed(self) -> None:
        if self.failures:
            raise TunefixError(f"the Modelfile TEMPLATE renders differently from the Jinja template: "
                               f"{self.failures[0]}", f"{len(self.failures)} of {self.checked} conversations differ")


def first_char_divergence(jinja: str, go: str) -> str | None:
    """Where two renderings first part: the character index and both texts around it."""
    if jinja == go:
        return None
    n = next((i for i, (a, b) in enumerate(zip(jinja, go, strict=False)) if a != b), min(len(jinja), len(go)))
    return (f"character {n}: Jinja {jinja[max(0, n - 12):n + 12]!r}, "
            f"Ollama {go[max(0, n - 12):n + 12]!r}")


def template_conversations() -> list[list[dict[str, str]]]:
    """With and without system, one and several turns, ending with a user or an assistant turn."""
    from tunefix.templates.probes import PROBES

    return [list(p) for p in PROBES] + [list(c) for c in CONVERSATIONS]


def template_parity(ollama_template: str, tok, *, system: str | None = None, jinja: str | None = None,
                    conversations: Sequence[Sequence[dict[str, str]]] | None = None) -> TemplateParity:
    """Render each conversation with Ollama's Go engine and with the Jinja template; compare.

    ``system`` is the Modelfile's SYSTEM: Ollama puts it first when a conversation has no
    system message, so the Jinja side gets it as a first message then. The Go form never
    writes BOS (llama.cpp adds it from ``add_bos_token``), so a BOS the Jinja template
    writes at the start is left out of the comparison.
    """
    from tunefix.templates.gorender import render_ollama_many
    from tunefix.templates.probes import wants_generation_prompt
    from tunefix.templates.render import render_jinja

    jinja = jinja if jinja is not None else tok.chat_template
    if not jinja:
        raise TunefixError("the tokenizer has no chat template to compare the Modelfile TEMPLATE with")
    # The tokenizer's special tokens as Hugging Face passes them, BOS left out (see above).
    specials = {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    specials.update(bos_token="", eos_token=tok.eos_token or "")
    convs = [list(c) for c in (conversations or template_conversations())]
    result = TemplateParity(checked=0)
    jobs, expected, labels = [], [], []
    for i, msgs in enumerate(convs):
        full = msgs if not system or msgs[0]["role"] == "system" else [{"role": "system", "content": system}, *msgs]
        label = f"conversation {i} ({len(msgs)} messages{', system' if msgs[0]['role'] == 'system' else ''})"
        try:
            text = render_jinja(jinja, full, add_generation_prompt=wants_generation_prompt(full), **specials)
        except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (raise_exception)
            result.skipped.append(f"{label}: {getattr(e, 'message', e)}")
            continue
        jobs.append((ollama_template, msgs, system or ""))
        expected.append(text)
        labels.append(label)
    for label, want, got in zip(labels, expected, render_ollama_many(jobs) if jobs else [], strict=True):
        result.checked += 1
        where = first_char_divergence(want, got)
        if where:
            result.failures.append(f"{label}: {where}")
    return result


# ----------------------------------------------------------------------- LoRA adapter


def lora_parity(base_gguf: str | os.PathLike, adapter_gguf: str | os.PathLike, model, tok, *,
                prompts: Sequence[Sequence[int]] | None = None, max_abs: float = 0.25,
                threads: int | None = None) -> LogitsParity:
    """llama.cpp with the GGUF adapter on the base GGUF vs PyTorch's base + PEFT adapter.

    ``model`` is the un-merged PEFT model (fp32); ``base_gguf`` a 16/32-bit conversion of
    the same base weights.
    """
    prompts = [list(p) for p in (prompts or prompt_ids(tok)[:2])]
    positions = compared = agreed = 0
    worst, first = 0.0, None
    with open_llama(base_gguf, n_ctx=max(map(len, prompts)) + 8, threads=threads, lora_path=adapter_gguf) as llm:
        for ids in prompts:
            c, a, m, f = _compare(tok, ids, torch_logits(model, ids), llama_logits(llm, ids), 0.0)
            positions, compared, agreed = positions + len(ids), compared + c, agreed + a
            worst, first = max(worst, m), first or f
    return LogitsParity(Path(adapter_gguf).name, positions, compared, agreed / compared if compared else 1.0,
                        worst, first, max_abs)


# ------------------------------------------------------------------------------ RoPE


@dataclass
class RopeParity:
    file: str
    config: dict  # the run's RoPE settings (doctor.rope.config_rope)
    gguf: dict    # the GGUF's (doctor.rope.gguf_rope)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_if_failed(self) -> None:
        if self.failures:
            raise TunefixError(f"{self.file}: RoPE metadata differs from the run's config: {self.failures[0]}",
                               "Long prompts would be computed with other rotations in llama.cpp; "
                               "convert again from a config with the model's rope_parameters")


def rope_parity(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike) -> RopeParity:
    """The exported GGUF's RoPE (freq_base, scaling type/factor/original context, llama3's
    ``rope_freqs.weight``) against the run's config.json. Read from the header and that one
    tensor; nothing is run. Scaling types other than linear, YaRN and llama3 are not judged."""
    import json
    import math

    import torch

    from tunefix.doctor.rope import config_rope, gguf_rope, gguf_rope_freqs, llama3_divisors

    gguf_file, hf_dir = Path(gguf_file), Path(hf_dir)
    want = config_rope(json.loads((hf_dir / "config.json").read_text(encoding="utf-8")))
    got = gguf_rope(gguf_file)
    out = RopeParity(gguf_file.name, want, got)
    if want["theta"] is not None and got["theta"] is not None \
            and not math.isclose(float(want["theta"]), float(got["theta"]), rel_tol=1e-6):
        out.failures.append(f"rope_theta {want['theta']} vs freq_base {got['theta']}")
    if want["type"] not in ("default", "llama3", "linear", "yarn"):
        return out
    if want["type"] != got["type"]:
        out.failures.append(f"scaling {want['type']} in the config, {got['type']} in the GGUF")
    elif want["type"] in ("linear", "yarn"):
        for key in ("factor", "original_context"):
            if want[key] is not None and (got[key] is None or not math.isclose(float(want[key]), float(got[key]))):
                out.failures.append(f"{key} {want[key]} in the config, {got[key]} in the GGUF")
    elif want["type"] == "llama3":
        freqs = gguf_rope_freqs(gguf_file)
        expected = llama3_divisors(float(want["theta"]), 2 * freqs.numel(), float(want["factor"]),
                                   float(want["low_freq_factor"]), float(want["high_freq_factor"]),
                                   int(want["original_context"]))
        if not torch.allclose(freqs, expected, rtol=1e-5):
            out.failures.append(f"rope_freqs differ from the config's llama3 scaling by up to "
                                f"{float((freqs - expected).abs().max()):.4g}")
    return out
