"""fp16 overflow: activations beyond fp16's 65,504 (bf16-trained families such as Gemma carry a
large residual stream). A T4 or V100 has no bf16, so an fp16 run there gives inf, then NaN.

The probe: one short real text through the decoder in fp32 (each layer cast to fp32 while it
runs, so a bf16 checkpoint costs one layer of extra memory), with hooks recording each decoder
layer's largest absolute activation: its output and every submodule's output inside it (the
projections autocast computes in fp16, the experts, the attention).

The fix (tunefix's, for fp16 runs): fp16 mixed precision as it is meant (fp32 weights, fp16
compute under autocast), except that the overflowing layers run with autocast off, in fp32.
transformers has the same idea per class (``_keep_in_fp32_modules``, T5's ``wo``); here it is
per measured layer and per instance: hooks on those layer objects, nothing patched on a class.
"""

from __future__ import annotations

from typing import Any

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding

FP16_MAX = 65504.0
MAX_TOKENS = 64  # one short sequence: the probe must stay cheap on an 8B model
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
              "Neil Armstrong stepped onto the surface and said: \"That's one small step for man.\"")


def decoder_layers(model) -> list[Any]:
    """The decoder's layer stack (the longest ModuleList named ``layers``/``h``)."""
    from torch import nn

    stacks = [m for n, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in ("layers", "h")]
    return list(max(stacks, key=len)) if stacks else []


def _largest(value) -> float:
    import torch

    if isinstance(value, torch.Tensor):
        return float(value.detach().abs().amax()) if value.is_floating_point() and value.numel() else 0.0
    if isinstance(value, tuple | list):
        return max((_largest(v) for v in value), default=0.0)
    return 0.0


def _to_fp32(value):
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_to_fp32(v) for v in value)
    return value


def layer_peaks(model, ids) -> list[float]:
    """Each decoder layer's largest absolute activation on ``ids`` (1, T), computed in fp32."""
    import torch

    layers = decoder_layers(model)
    peaks = [0.0] * len(layers)
    handles = []
    dtypes: dict[int, torch.dtype] = {}

    def record(i):
        def hook(_module, _args, output):
            peaks[i] = max(peaks[i], _largest(output))
        return hook

    def enter(i):
        def hook(layer, args, kwargs):
            dtypes[i] = next(layer.parameters()).dtype
            layer.float()
            return _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}
        return hook

    def leave(i):
        def hook(layer, _args, _output):
            layer.to(dtypes.pop(i, torch.float32))
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(leave(i), always_call=True))
            handles += [m.register_forward_hook(record(i)) for m in layer.modules()]
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda _m, _a, out: out.float()))
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            model.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return peaks


def probe_ids(p: Probe):
    import torch

    tok = p.s.tokenizer
    text = p.rendered.text if p.rendered is not None else PROBE_TEXT
    bos = tok.bos_token or ""
    ids = tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"][:MAX_TOKENS]
    device = next(p.model.parameters()).device
    return torch.tensor([ids], device=device)


def fp16_overflow(p: Probe) -> Finding | None:
    """Only with a model loaded (the probe runs it); quantised models are skipped (their
    compute dtype is set by the quantiser)."""
    import torch

    model = p.model
    if model is None or p.s.tokenizer is None or getattr(model, "hf_quantizer", None) is not None \
            or not decoder_layers(model):
        return None
    peaks = layer_peaks(model, probe_ids(p))
    over = [i for i, peak in enumerate(peaks) if peak > FP16_MAX]
    if not over:
        return None
    fp16_run = p.run_dtype in (torch.float16, "float16", "fp16")
    evidence = {"layers": over, "largest": max(peaks), "peaks": [round(x, 1) for x in peaks], "fp16_max": FP16_MAX}
    where = "this fp16 run gives inf/NaN" if fp16_run else "an fp16 run (a GPU without bf16) would give inf/NaN"
    return Finding("fp16-overflow", "error" if fp16_run else "warning",
                   f"activations reach {max(peaks):.4g} in decoder layer(s) {over}, beyond fp16's "
                   f"{FP16_MAX:.0f}: {where}", evidence,
                   fix="compute those layers in fp32 with fp32 weights (tunefix does so for fp16 runs); "
                       "or use bf16 or fp32", fixer="fix_fp16_overflow" if fp16_run else None)


# ------------------------------------------------------------------------------- fix


def keep_in_fp32(model, layers: list[int]) -> None:
    """Run ``layers`` (decoder layer indices) in fp32 with autocast off; the rest of the model
    keeps fp16 autocast. Hooks on those layer instances: the autocast switch is entered before
    each call and left after it, an exception included (``always_call``)."""
    import torch

    stack = decoder_layers(model)

    def enter(layer, args, kwargs):
        device = next(layer.parameters()).device.type
        ctx = torch.autocast(device, enabled=False)
        ctx.__enter__()
        layer._tunefix_fp32.append(ctx)
        return _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}

    def leave(layer, _args, _output):
        if layer._tunefix_fp32:
            layer._tunefix_fp32.pop().__exit__(None, None, None)

    for i in layers:
        layer = stack[i]
        if hasattr(layer, "_tunefix_fp32"):
            continue  # already kept in fp32
        layer.float()
        layer._tunefix_fp32 = []
        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(leave, always_call=True)


def fix_fp16_overflow(model, layers: list[int]) -> str:
    """fp32 weights (fp16 mixed precision keeps its master weights in fp32; half weights without
    autocast would have to hold the overflowing residual in fp16) and the layers in fp32."""
    import torch

    cast = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    if cast:
        model.float()
    keep_in_fp32(model, layers)
    return (f"decoder layers {layers} computed in fp32 (fp16 overflow)"
            + ("; weights cast to fp32 for fp16 mixed precision" if cast else ""))
