"""Issue 5: load with fixes, LoRA, continued pretraining, config, training, resume."""

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

from tunefix import assets, tiny
from tunefix.cli import main
from tunefix.train.config import RunConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALPACA = EXAMPLES / "alpaca_sample.json"


def _cfg(tmp_path, **kw) -> RunConfig:
    base = dict(model=str(tiny.tiny_model("llama")), data=str(ALPACA), template="llama-3",
                output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, gradient_accumulation=1,
                save_steps=2, warmup_steps=0, learning_rate=1e-3, max_seq_length=128, seed=1)
    base.update(kw)
    return RunConfig(**base)


# ------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("override,needle", [
    ("lora_rr=8", "unknown config key --lora-rr"),
    ("lora_r=-4", "--lora-r must be a positive number"),
    ("data=/no/such/file.csv", "--data /no/such/file.csv: no such file"),
    ("max_seq_length=0", "--max-seq-length must be a positive number"),
    ("finetune=qlora", "--finetune must be lora or full"),
    ("--finetune=full --load-in-4bit", "--finetune full cannot train 4-bit weights"),
    # the training methods' settings (issue 19)
    ("--method dpo --beta 0", "--beta must be a positive number"),
    ("--beta 0.5", "--beta is a setting of dpo and orpo and kto, not of --method sft"),
    ("--method dpo --loss-type nope", "--loss-type must be one of sigmoid, hinge"),
    ("--method kto --loss-type ipo", "--loss-type must be one of kto, apo_zero_unpaired for kto"),
    ("--method grpo", "--method grpo needs --rewards"),
    ("--method grpo --rewards json --num-generations 1", "--num-generations must be 2 or more"),
    ("--method grpo --rewards json,stopped --reward-weights 1", "--reward-weights must be 2 finite numbers"),
    ("--method dpo --rewards json", "--rewards is a setting of grpo, not of --method dpo"),
    ("--method cpt --format alpaca", "--method cpt trains on raw text"),
    ("--method ppo", "--method must be sft, cpt, dpo, orpo, kto or grpo, got 'ppo'"),
])
def test_bad_configs_exit_2_before_loading(override, needle, capsys, monkeypatch):
    import tunefix.model.load as load

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(load, "load_model", no_load)
    code = main(["train", str(EXAMPLES / "titanic.yaml"), *override.split()])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_config_yaml_and_overrides():
    cfg = load_config(str(EXAMPLES / "titanic.yaml"), ["lora_r=32", "--max-steps", "7", "--use-rslora"])
    assert (cfg.lora_r, cfg.max_steps, cfg.use_rslora) == (32, 7, True)
    assert Path(cfg.data).is_file()  # relative to the YAML file
    cfg.validate()


# ------------------------------------------------------------------ load_model + rows


def test_load_model_fixes_pad_and_reports():
    from tunefix.model.load import load_model

    lines = []
    model, tok = load_model(str(assets.smollm2()), report=lines.append)
    assert tok.pad_token_id != tok.eos_token_id
    assert any("pad token is now" in line for line in lines)
    assert model.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("family,template,bos", [("llama", "llama-3", "<|begin_of_text|>"),
                                                   ("qwen2", None, None)])
def test_training_rows_one_bos_and_end_of_turn(family, template, bos, tmp_path):
    from transformers import AutoTokenizer

    from tunefix.templates import template_for
    from tunefix.train.rows import prepare_data, tokenize

    cfg = _cfg(tmp_path, model=str(tiny.tiny_model(family)), template=template)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    tpl, rows, _ = prepare_data(cfg, tok)
    assert tpl == template_for(tok, template)
    eot = tok.convert_tokens_to_ids(tpl.eot)
    for row in tokenize(cfg, tok, tpl, rows):
        ids, labels = row["input_ids"], row["labels"]
        if bos is None:
            assert tok.bos_token_id is None or tok.bos_token_id not in ids
        else:
            assert ids.count(tok.convert_tokens_to_ids(bos)) == 1 and ids[0] == tok.convert_tokens_to_ids(bos)
        trained = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
        assert trained[-1] == eot


# ------------------------------------------------------------------------------ LoRA


def test_lora_defaults_and_peft_format(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunefix.train.trainer import train

    result = train(_cfg(tmp_path, max_steps=2))
    adapter = result.run_dir / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 16 and conf["lora_alpha"] == 32 and conf["lora_dropout"] == 0.0
    assert set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(tiny.tiny_model("llama"), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)


def test_phi3_fused_projections_get_their_own_adapters():
    from transformers import AutoModelForCausalLM

    from tunefix.model.lora import add_lora, fuse_projections

    path = tiny.tiny_model("phi3")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701]])
    expected = ref(ids).logits
    peft_model = add_lora(model)
    names = {n for n, _ in peft_model.named_modules()}
    for part in ("qkv_proj.q_proj", "qkv_proj.k_proj", "qkv_proj.v_proj", "gate_up_proj.gate_proj",
                 "gate_up_proj.up_proj"):
        assert any(n.endswith(part + ".lora_A") for n in names), part
    torch.testing.assert_close(peft_model(ids).logits, expected)  # B = 0: same function
    with torch.no_grad():  # a trained adapter: the merged, re-fused model must equal it
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    adapted = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    assert fuse_projections(merged) == 2 * ref.config.num_hidden_layers
    assert isinstance(merged.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapted, expected)


def test_continued_pretraining_embedding_learning_rate(tmp_path):
    from tunefix.model.load import load_model
    from tunefix.model.lora import add_lora
    from tunefix.train.arguments import build_optimizer

    cfg = _cfg(tmp_path, train_embeddings=True, learning_rate=1e-4)
    model, _ = load_model(cfg.model, report=None)
    model = add_lora(model, train_embeddings=True)
    opt = build_optimizer(model, cfg)
    main_group, emb_group = opt.param_groups
    assert main_group["lr"] == 1e-4 and emb_group["lr"] == pytest.approx(1e-5)
    emb_names = {n for n, p in model.named_parameters() if any(p is q for q in emb_group["params"])}
    assert emb_names and all("embed_tokens" in n or "lm_head" in n for n in emb_names)
    assert not any("lora" in n for n in emb_names)


def test_full_fine_tuning_trains_every_weight_and_exports_as_a_model(tmp_path):
    from safetensors.torch import load_file

    from tunefix.train.arguments import build_optimizer
    from tunefix.train.run import is_full, load_run
    from tunefix.train.trainer import train

    cfg = _cfg(tmp_path, finetune="full", learning_rate=1e-4, max_steps=2)
    result = train(cfg)
    run = result.run_dir
    assert is_full(run) and not (run / "adapter").exists()
    assert result.losses[-1][1] < result.losses[0][1]
    base = load_file(str(tiny.tiny_model("llama") / "model.safetensors"))
    trained = load_file(str(run / "model" / "model.safetensors"))
    changed = [k for k in base if k in trained and base[k].shape == trained[k].shape
               and not torch.equal(base[k], trained[k])]
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    assert any("embed_tokens" in k for k in changed)  # every weight, not an adapter
    model, tok, template, loaded_cfg = load_run(run)
    assert loaded_cfg.finetune == "full" and not hasattr(model, "peft_config")
    got = model.get_input_embeddings().weight
    assert torch.equal(got, trained["model.embed_tokens.weight"][: got.shape[0]])
    # One learning rate for all unless the split is asked for; with it, the embeddings' own.
    model.requires_grad_(True)
    assert len(build_optimizer(model, cfg).param_groups) == 1
    split = build_optimizer(model, _cfg(tmp_path, finetune="full", embedding_learning_rate=1e-6)).param_groups
    assert [g["lr"] for g in split] == [1e-3, 1e-6]
    assert main(["export", str(run), "--out", str(tmp_path / "export"), "--merged", "--no-verify"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "lora"), "--lora-only"]) == 2
    assert not (tmp_path / "lora").exists()
    merged = load_file(str(tmp_path / "export" / "merged" / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(merged[key].float(), trained[key], atol=1e-2)


# ------------------------------------------------------------------------ resume


def test_interrupt_and_resume_continues_the_same_curve(tmp_path):
    from tunefix.train.trainer import train

    full = train(_cfg(tmp_path, output_dir=str(tmp_path / "full"), max_steps=4, save_steps=2))
    # An interrupted copy: everything after the step-2 checkpoint is gone.
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    for name in ("adapter", "tokenizer", "summary.json", "loss.png", "metrics.jsonl"):
        p = cut / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    resumed = train(_cfg(tmp_path, output_dir=str(cut), max_steps=4, save_steps=2, resume=True))
    want = dict(full.losses)
    got = dict(resumed.losses)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5)


def test_run_dir_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["train", "--data", str(ALPACA), "--model", str(tiny.tiny_model("llama")),
                 "--template", "llama-3", "--output-dir", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_nan_loss_stops_with_the_doctors_cause(tmp_path):
    from safetensors.torch import load_file, save_file

    from tunefix.errors import TunefixError
    from tunefix.train.trainer import train

    model_dir = tmp_path / "broken"
    shutil.copytree(tiny.tiny_model("llama"), model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TunefixError) as err:
        train(_cfg(tmp_path, model=str(model_dir), max_steps=3))
    assert "nan" in err.value.message.lower() and "nonfinite-weights" in (err.value.hint or "")


def test_packed_rows_do_not_see_each_other():
    from transformers import AutoModelForCausalLM

    from tunefix.data import pack
    from tunefix.train.rows import Collator

    model = AutoModelForCausalLM.from_pretrained(tiny.tiny_model("llama"), dtype=torch.float32).eval()
    rows = [{"input_ids": [128000, 9906, 1917, 0, 473], "labels": [-100, 9906, 1917, 0, 473]},
            {"input_ids": [128000, 22, 33, 44], "labels": [-100, 22, 33, 44]},
            {"input_ids": [128000, 7, 8], "labels": [-100, 7, 8]}]
    packs = pack(rows, max_seq_length=9)
    assert [p["seq_lens"] for p in packs] == [[5, 4], [3]]
    batch = Collator(pad_id=0)(packs)
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits
        alone = [model(torch.tensor([r["input_ids"]])).logits[0] for r in rows]
    torch.testing.assert_close(packed[0, :5], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[0, 5:9], alone[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[1, :3], alone[2], rtol=1e-4, atol=1e-4)


def test_training_with_packing(tmp_path):
    from tunefix.train.trainer import train

    result = train(_cfg(tmp_path, packing=True, max_steps=2, max_seq_length=96))
    assert len(result.losses) == 2 and all(v == v for _, v in result.losses)  # finite, not NaN
    assert result.train_rows < 8  # the 8 rows were packed into fewer sequences


def test_lora_rank_above_hidden_size_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import tunefix.model.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code = main(["train", "--data", str(ALPACA), "--model", str(tiny.tiny_model("llama")), "--template",
                 "llama-3", "--output-dir", str(tmp_path / "r"), "--lora-r", "512"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "larger than the model's hidden size (256)" in err[0]
    assert not (tmp_path / "r").exists()


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            (Path(output_dir) / "optimizer.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    args = ["train", "--data", str(ALPACA), "--model", str(tiny.tiny_model("llama")), "--template", "llama-3",
            "--output-dir", str(tmp_path / "run"), "--max-steps", "4", "--save-steps", "2",
            "--gradient-accumulation", "1", "--max-seq-length", "128"]
    code = main(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tunefix: error")]
    assert code == 2 and len(err) == 1, err
    assert "no space left on device" in err[0] and "--resume continues from checkpoint-2" in err[0]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"]  # the half-written one is gone
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    assert main([*args, "--resume"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ metric loggers


def _scalars(event_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_and_wandb_offline_log_the_same_losses_into_the_run_dir(tmp_path, monkeypatch):
    from tunefix.train.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run directory is train()'s own choice
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory
    result = train(_cfg(tmp_path, max_steps=3, save_steps=10, report_to="tensorboard,wandb"))
    run = result.run_dir
    [events] = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    logged = _scalars(events, "train/loss")
    assert sorted(logged) == [1, 2, 3]
    for step, loss in result.losses:
        assert logged[step] == pytest.approx(loss, rel=1e-6)
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_auto_reporting_skips_wandb_when_not_logged_in(tmp_path, monkeypatch):
    from tunefix.train.arguments import report_to

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert report_to(_cfg(tmp_path)) == ["tensorboard"]  # both installed by the dev extra
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert report_to(_cfg(tmp_path)) == ["tensorboard", "wandb"]
    assert report_to(_cfg(tmp_path, report_to="none")) == []


def test_unknown_logger_is_refused_before_loading(capsys, monkeypatch):
    import tunefix.model.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code = main(["train", str(EXAMPLES / "titanic.yaml"), "--report-to", "mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--report-to must be auto, none or a list" in err[0], err


def test_fast_paths_in_the_trainer_give_the_reference_losses(tmp_path, monkeypatch):
    # Padding-free groups + mask dropped + selective checkpointing + fused LoRA + lean
    # allocator vs the batch as given + `on` + PEFT's LoRA forward.
    from tunefix.model import allocator, padding
    from tunefix.train.trainer import train

    phases = []
    for name in ("forward_phase", "backward_phase"):
        real = getattr(allocator.AllocatorTuning, name)
        monkeypatch.setattr(allocator.AllocatorTuning, name,
                            lambda self, real=real, name=name: (phases.append(name), real(self))[1])
    splits = []
    real_split = padding.split_rows
    monkeypatch.setattr(padding, "split_rows", lambda *a, **k: splits.append(real_split(*a, **k)) or splits[-1])
    monkeypatch.setattr(padding, "MIN_GROUP_TOKENS_CPU", 1)  # the Alpaca rows are short...
    monkeypatch.setattr(padding, "MAX_WASTE", 0.0)  # ...and of similar lengths

    ref = train(_cfg(tmp_path, output_dir=str(tmp_path / "ref"), max_steps=3, save_steps=10,
                     drop_padding_mask=False, gradient_checkpointing="on", fused_lora=False,
                     padding_free=False))
    assert splits == []
    fast = train(_cfg(tmp_path, output_dir=str(tmp_path / "fast"), max_steps=3, save_steps=10,
                      drop_padding_mask=True, gradient_checkpointing="selective", cpu_allocator="lean",
                      fused_lora=True))
    assert len(splits) == 3 and any(len(groups) == 2 for groups in splits)  # some rows ran apart
    assert [s for s, _ in fast.losses] == [1, 2, 3]
    for (_, a), (_, b) in zip(ref.losses, fast.losses, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    if platform.libc_ver()[0] == "glibc":  # lean: the heap for each backward, mmaps for each forward
        micro = 3 * _cfg(tmp_path).gradient_accumulation
        assert phases == ["forward_phase", "backward_phase"] * micro


def test_checkpointing_auto_is_selective_on_a_cpu_and_on_with_cuda(tmp_path, monkeypatch):
    from tunefix.model import checkpointing
    from tunefix.train.memory import memory_hint
    from tunefix.train.trainer import train

    assert _cfg(tmp_path).gradient_checkpointing == "auto"
    assert checkpointing.resolve_checkpointing("auto", cuda=False) == "selective"
    assert checkpointing.resolve_checkpointing("auto", cuda=True) == "on"
    assert [checkpointing.resolve_checkpointing(m, cuda=True) for m in checkpointing.MODES] == list(
        checkpointing.MODES)
    # The out-of-memory advice reads the resolved mode: offload is the next step from `on`.
    assert "--gradient-checkpointing offload" in memory_hint(_cfg(tmp_path), cuda=True)
    assert "--gradient-checkpointing on (selective keeps" in memory_hint(_cfg(tmp_path), cuda=False)

    applied = []
    real = checkpointing.apply_checkpointing
    monkeypatch.setattr(checkpointing, "apply_checkpointing",
                        lambda model, mode, **kw: (applied.append(mode), real(model, mode, **kw))[1])
    train(_cfg(tmp_path, max_steps=1, save_steps=10))
    assert applied == ["selective"]
