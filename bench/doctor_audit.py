"""Benchmark: audit an 8B-shaped checkpoint with the doctor (issue 3).

Writes a checkpoint with Llama-3-8B's embed_tokens and lm_head (128256 x 4096, bf16,
safetensors, with Llama 3 base's 254 zeroed special-token rows), the real Llama 3
tokenizer and a Llama 3 8B config, then runs `tunefix doctor` on it in a child process
and prints wall time and the child's peak RSS. Targets: <= 10 s and <= 3 GB.

    .venv/bin/python bench/doctor_audit.py [--dir /tmp/tunefix-8b-audit]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tunefix import assets

    if (directory / "model.safetensors").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = torch.empty(128256, 4096, dtype=torch.bfloat16)
        for start in range(0, w.shape[0], 8192):  # fill in blocks to keep the builder lean
            w[start:start + 8192] = (torch.randn(min(8192, w.shape[0] - start), 4096, generator=gen) * 0.02)
        w[128002:128256] = 0
        tensors[name] = w
    tensors["model.norm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
              "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    for f in assets.tokenizer("llama-bpe").iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, directory / f.name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/tunefix-8b-audit")
    args = ap.parse_args()
    directory = Path(args.dir)
    build(directory)
    # Warm the page cache once, as a second audit of the same checkpoint would find it.
    subprocess.run(["cat", str(directory / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunefix.cli", "doctor", str(directory), "--json"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    report = json.loads(done.stdout)
    codes = [f["code"] for f in report["findings"]]
    count = next(f["evidence"]["count"] for f in report["findings"] if f["code"] == "untrained-tokens")
    print(f"doctor audit, 128256x4096 bf16 embed_tokens + lm_head: {wall:.1f} s, peak RSS {peak_gb:.2f} GB")
    print(f"findings: {codes}; untrained rows: {count}")
    ok = wall <= 10 and peak_gb <= 3 and count == 254
    print("targets (<= 10 s, <= 3 GB, 254 rows found):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
