"""What bench/train.py and bench/context.py share: the models, the data, the two training sides.

Both benchmarks build the model, the LoRA and each side's step here, so a speed figure and a
context-length figure are about the same training code:

- baseline: what a careful user writes with transformers + PEFT: gradient checkpointing on
  (non-reentrant, model.train()), ``model(**batch).loss``.
- tunefix: on a CPU ``tune_cpu_allocator()`` (glibc thresholds for each forward, glibc's
  heap for each backward: ``tunefix.model.allocator``, with torch's huge pages:
  ``child_env``) and ``apply_checkpointing(model, "selective")`` (each layer's attention output kept,
  ``tunefix.model.selective``); on CUDA ``apply_checkpointing(model, "offload")`` (the
  saved layer inputs in pinned host memory); on both ``drop_padding_mask`` (right-padded
  batches attend causally, without the mask: ``tunefix.model.padding``) and
  ``model_loss`` (chunked lm_head + cross-entropy on the scored tokens only), run on the
  rows in groups cut to their own length (``padding_free_loss``: no padding computed),
  and ``fuse_lora_forward`` (each LoRA update accumulated into its base output).
  ``--checkpointing`` picks another mode for the tunefix side.

Models: ``smollm2`` (SmolLM2-135M-Instruct, real weights), ``tiny128k`` (hidden 256,
2 layers, the real 128k Llama 3 vocabulary), ``tiny-qwen3-moe`` and ``tiny-qwen3.5`` (the tiny
test models of those families: MoE experts, Gated DeltaNet linear attention) and ``llama3-8b`` (Llama-3-8B's shapes,
random weights, random token ids: no checkpoint or tokenizer needed, so it runs on a bare
GPU machine; ``--layers``/``--hidden`` scale it down for CPU checks).
"""

from __future__ import annotations

import csv
import resource
import time
from pathlib import Path

SEED = 0
LR = 2e-4
TITANIC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "titanic.csv"
MODELS = ("smollm2", "tiny128k", "tiny-qwen3-moe", "tiny-qwen3.5", "llama3-8b")
# The tiny models of families with their own layer kinds (tunefix.tiny): MoE experts, linear attention.
TINY_FAMILIES = {"tiny128k": "llama", "tiny-qwen3-moe": "qwen3_moe", "tiny-qwen3.5": "qwen3_5"}
SIDES = ("baseline", "tunefix")

# Meta-Llama-3-8B's config.json (the dims and rope; weights random here).
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)
LLAMA3_8B_PARAMS = 8_030_261_248  # its parameter count (embeddings and lm_head untied)


def add_model_args(p) -> None:
    """The options that pick the model, the LoRA and the device (both benchmarks take them)."""
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha is 2r)")
    p.add_argument("--quant", choices=["none", "4bit"], default="none",
                   help="4bit: frozen weights in bitsandbytes NF4 (QLoRA)")
    p.add_argument("--layers", type=int, default=0, help="llama3-8b: layers (0: 32)")
    p.add_argument("--hidden", type=int, default=0,
                   help="llama3-8b: hidden size, heads and MLP scaled alike (0: 4096)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--checkpointing", choices=["", "on", "offload", "selective"], default="",
                   help="the tunefix side's checkpointing (default: selective on CPU, offload on CUDA)")
    p.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                   help="the tunefix side's glibc malloc on a CPU: tune_cpu_allocator() or left alone")
    p.add_argument("--padding", choices=["free", "dynamic"], default="free",
                   help="the tunefix side: rows in groups cut to their length, or the padded batch")


def check_model_args(p, args, *, dry_run: bool = False) -> None:
    """Refuse combinations that cannot run here, in the options' own words."""
    if args.model == "llama3-8b" and args.device == "cpu" and not dry_run and not (
            args.layers and args.hidden):
        p.error("llama3-8b at full size needs --device cuda (or --layers and --hidden to "
                "scale it down)")
    if args.quant == "4bit" and not dry_run:
        from tunefix._optional import has_bitsandbytes

        if not has_bitsandbytes():
            p.error("--quant 4bit needs bitsandbytes, which is not importable")


def model_argv(args, precision: str) -> list[str]:
    """``add_model_args``' options as a child process gets them, the precision resolved."""
    return ["--model", args.model, "--device", args.device, "--lora-r", str(args.lora_r),
            "--quant", args.quant, "--layers", str(args.layers), "--hidden", str(args.hidden),
            "--precision", precision, "--threads", str(args.threads),
            f"--checkpointing={args.checkpointing}", "--allocator", args.allocator,
            "--padding", args.padding]


def child_env(args=None, side: str = "baseline") -> dict:
    """The environment of a child process; the tunefix side with the tuned allocator on a CPU
    also gets torch's huge pages (they must be on before the child imports torch)."""
    import os

    from tunefix.model.allocator import THP_ENV, kernel_has_huge_pages

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if (side == "tunefix" and args is not None and args.device == "cpu" and args.allocator == "tuned"
            and kernel_has_huge_pages()):
        env.setdefault(THP_ENV, "1")
    return env


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device: str) -> str:
    """bf16 on CUDA and on CPUs with bf16 instructions, else fp32 (design.md: emulated bf16 is slow)."""
    return "bf16" if device == "cuda" or cpu_has_bf16() else "fp32"


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from tunefix import assets

        return assets.smollm2()
    if name in TINY_FAMILIES:  # hidden 256, the family's layers, its real vocabulary
        from tunefix.tiny import tiny_model

        return tiny_model(TINY_FAMILIES[name])
    raise SystemExit(f"unknown model {name!r}")


def llama3_8b_config(layers: int | None = None, hidden: int | None = None):
    """Llama-3-8B's LlamaConfig; ``hidden`` scales hidden, heads and MLP width down alike."""
    from transformers import LlamaConfig

    dims = dict(LLAMA3_8B)
    if layers:
        dims["num_hidden_layers"] = layers
    if hidden and hidden != dims["hidden_size"]:
        scale = hidden / dims["hidden_size"]
        heads = max(1, round(dims["num_attention_heads"] * scale))  # head_dim stays 128
        dims.update(hidden_size=heads * 128, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 4),
                    intermediate_size=round(dims["intermediate_size"] * scale / 256) * 256)
    return LlamaConfig(**dims)


def random_model(config, device: str, dtype):
    """A randomly initialised causal LM made directly on ``device`` (``meta``: shapes only).

    Made under ``torch.device`` so no full-size copy ever exists on the CPU: an 8B model in
    bf16 is 16 GB straight on the GPU, initialised there by transformers' own init.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def quantize_4bit(model):
    """Each decoder Linear as bitsandbytes NF4 (double quantised, bf16 compute), in place.

    The random-weight stand-in for ``from_pretrained(..., quantization_config=
    BitsAndBytesConfig(load_in_4bit=True, ...))`` with tunefix's settings
    (``tunefix.model.load``): the same module types and flags, so PEFT adds its 4-bit LoRA.
    The lm_head stays in bf16, as transformers leaves it.
    """
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is model.get_output_embeddings():
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            setattr(parent, name, layer.to(device))  # .to quantises the weight
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT reads it
    return model


def load(args):
    """(model, token stream, pad id) for ``args.model`` on ``args.device``."""
    import torch

    on_cuda = args.device == "cuda"
    weights = torch.bfloat16 if on_cuda else torch.float32
    if args.model == "llama3-8b":
        model = random_model(llama3_8b_config(args.layers, args.hidden), args.device, weights)
        # Random ids: the weights are random too, and a bare GPU machine has no tokenizer.
        g = torch.Generator().manual_seed(SEED)
        stream = torch.randint(0, model.config.vocab_size, (1 << 16,), generator=g).tolist()
        pad = 0
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_dir(args.model)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        stream = titanic_stream(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=weights).to(args.device)
    if getattr(args, "quant", "none") == "4bit":
        quantize_4bit(model)
    return model, stream, pad


def corpus() -> list[str]:
    """One sentence per Titanic passenger (real, varied text; the project's demo data)."""
    with TITANIC.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [", ".join(f"{k} {v}" for k, v in row.items() if v) + "." for row in rows]


def titanic_stream(tokenizer) -> list[int]:
    """The corpus in a seeded random order, as one stream of token ids (about 50k)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    texts = corpus()
    order = torch.randperm(len(texts), generator=g).tolist()
    return tokenizer("\n".join(texts[i] for i in order), add_special_tokens=False)["input_ids"]


def batches(stream: list[int], pad: int, seq: int, count: int, batch: int, *,
            full: bool = False) -> list[dict]:
    """``count`` batches of ``batch`` rows cut from ``stream`` (wrapping around).

    Default: row lengths uniform in [seq/2, seq], padded to the longest row of the batch
    (dynamic padding); the first quarter of each row is a "prompt" (label -100), as in
    supervised fine-tuning with response-only labels; padding is labelled -100 too.
    ``full``: every row exactly ``seq`` tokens, all scored (continued pretraining: the
    most the lm_head can cost).
    """
    import torch

    g = torch.Generator().manual_seed(SEED)
    out, offset = [], 0
    for _ in range(count):
        if full:
            lengths = [seq] * batch
        else:
            lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g).tolist()
        width = max(lengths)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for r, n in enumerate(lengths):
            row = torch.tensor([stream[(offset + i) % len(stream)] for i in range(n)])
            offset = (offset + n) % len(stream)
            ids[r, :n], mask[r, :n] = row, 1
            first = 0 if full else n // 4
            labels[r, first:n] = row[first:]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def prepare_side(side: str, model, *, lora_r: int, device: str, checkpointing: str = "",
                 allocator: str = "tuned", padding: str = "free"):
    """Add the LoRA (r, alpha 2r, dropout 0, tunefix's default targets) and set up ``side``.

    checkpointing: the tunefix side's mode (default: ``selective`` on a CPU, ``offload``
    on CUDA); the baseline always uses transformers' own.
    allocator: ``default`` leaves the tunefix side's glibc malloc alone (for attribution).
    padding: ``free`` runs the rows in groups cut to their own length (``padding_free_loss``),
    ``dynamic`` the padded batch as the baseline does (for attribution).

    Returns (peft model, step_loss: batch -> loss, what the side did beyond the baseline).
    """
    from peft import LoraConfig, get_peft_model

    from tunefix.model.lora import ALL_LINEAR, LINEAR_ATTENTION

    # Both sides adapt the same layers: tunefix's default targets, which are PEFT's all-linear
    # on dense models, plus Qwen3.5's linear-attention projections, minus a MoE router (PEFT's
    # "all-linear" adapts Qwen3-MoE's mlp.gate; tunefix leaves routers alone, see design.md).
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                      target_modules=list(ALL_LINEAR + LINEAR_ATTENTION), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if side == "baseline":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode, where checkpointing does nothing

        def step_loss(batch):
            return model(**batch, use_cache=False).loss

        return model, step_loss, {}

    from tunefix.model.allocator import tune_cpu_allocator
    from tunefix.model.checkpointing import apply_checkpointing
    from tunefix.model.fused_lora import fuse_lora_forward
    from tunefix.model.padding import groups_pay_off, padding_free_loss

    # Process-wide malloc settings: the start of training, CPU only (on CUDA the
    # activations are not in malloc's heap).
    tuning = tune_cpu_allocator(enabled=device == "cpu" and allocator == "tuned")
    notes = {"allocator": dict(tuning.applied, huge_pages=tuning.huge_pages) if tuning else {}}
    # CPU: memory is what the allocator gave back; spend a little of it on keeping each
    # layer's attention output. CUDA: the saved layer inputs go to host memory.
    notes["checkpointing"] = checkpointing or ("selective" if device == "cpu" else "offload")
    apply_checkpointing(model, notes["checkpointing"])
    notes["fused_lora_layers"] = fuse_lora_forward(model)
    # As the trainer decides: no groups where each forward rebuilds the expert weights (MoE).
    padding = padding if groups_pay_off(model) else "dynamic"
    notes["padding"] = padding

    def step_loss(batch):
        if tuning:
            tuning.forward_phase()
        loss = padding_free_loss(model, batch, enabled=padding == "free")
        if tuning:
            tuning.backward_phase()  # train_step runs the backward next
        return loss

    return model, step_loss, notes


def start_child(args, side: str, *, count: int, batch: int, full: bool = False):
    """In a child process: threads, model, ``count`` batches of ``args.seq``, the side set up.

    Returns (model, step_loss, optimizer, batches, notes); see ``prepare_side``.
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        require_cuda()
    model, stream, pad = load(args)
    data = batches(stream, pad, args.seq, count, batch, full=full)
    model, step_loss, notes = prepare_side(side, model, lora_r=args.lora_r, device=args.device,
                                           checkpointing=args.checkpointing, allocator=args.allocator,
                                           padding=args.padding)
    return model, step_loss, optimizer_for(model), data, notes


def optimizer_for(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def train_step(model, step_loss, optimizer, micro_batches: list[dict], *, device: str,
               precision: str) -> tuple[float, float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation); (loss, seconds).

    The loss of each micro-batch is divided by their count (the mean over micro-batches).
    """
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    total = 0.0
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = step_loss(batch) / len(micro_batches)
        loss.backward()
        total += loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return total, time.perf_counter() - start


def peak_memory_mb(device: str) -> float:
    """Peak of this process: RSS on a CPU (``ru_maxrss``), allocated GPU memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def require_cuda() -> None:
    """Exit with a clear message when CUDA is asked for and there is none."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
