"""Issue 19: the training methods (sft, cpt, dpo, orpo, kto, grpo) as config and CLI, and DPO
end to end on TRL: the run, its reference, evaluation, a stage on an earlier run, resume."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from tunefix import tiny
from tunefix.cli import main
from tunefix.train.config import CHOICES, RunConfig, load_config
from tunefix.train.methods import DPO_LOSSES, METHODS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _pairs(path: Path, n: int = 12) -> Path:
    """Pairs with one preference a few steps can learn (always yes over no; a random tiny model
    has no sense of a rule to fit, such as parity, and 4 steps of it only oscillate)."""
    rows = []
    for i in range(n):
        good, bad = "yes", "no"
        rows.append({"prompt": [{"role": "user", "content": f"Is {i} even? Answer yes or no."}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _dpo(tmp_path: Path, **kw) -> RunConfig:
    base = dict(model=str(tiny.tiny_model("llama")), data=str(_pairs(tmp_path / "pairs.jsonl")), template="llama-3",
                method="dpo", output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, gradient_accumulation=1,
                save_steps=2, warmup_steps=0, learning_rate=5e-3, max_seq_length=128, seed=1, report_to="none",
                beta=0.5)
    base.update(kw)
    return RunConfig(**base)


# ------------------------------------------------------------------ config and CLI


def test_every_method_has_one_record():
    assert tuple(METHODS) == CHOICES["method"] == ("sft", "cpt", "dpo", "orpo", "kto", "grpo")


def test_dpo_losses_are_trls():
    """The loss names tunefix validates against are the ones TRL's DPOConfig documents."""
    import trl

    doc = next(f for f in dataclasses.fields(trl.DPOConfig) if f.name == "loss_type").metadata["help"]
    assert set(DPO_LOSSES) == set(re.findall(r"`'(\w+)'`", doc.split("If multiple")[0]))


def test_method_lora_or_full_of_older_configs_is_finetune(tmp_path):
    """``method: full`` (a config written before preference training, or an old run's
    config.json) still means full fine-tuning; in a dataclass it is refused with the new name."""
    old = tmp_path / "old.yaml"
    old.write_text(f"data: {EXAMPLES / 'alpaca_sample.json'}\nmethod: full\n", encoding="utf-8")
    cfg = load_config(str(old))
    assert (cfg.method, cfg.finetune) == ("sft", "full")
    with pytest.raises(Exception, match="--method full is now --finetune full"):
        RunConfig(data=str(EXAMPLES / "alpaca_sample.json"), method="full").validate()


# ------------------------------------------------------------------ DPO end to end


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A short DPO run on the tiny Llama (learning rate high enough to move in 4 steps)."""
    from tunefix.train.trainer import train

    tmp = tmp_path_factory.mktemp("dpo")
    cfg = _dpo(tmp, eval_fraction=0.25)
    return cfg, train(cfg)


def test_dpo_run_writes_the_run_directory(dpo_run):
    cfg, result = dpo_run
    run = Path(cfg.output_dir)
    assert result.steps == 4 and (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "loss.png").is_file() and (run / "template.json").is_file()
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [x for x in logs if "loss" in x]
    assert len(trained) == 4 and all(x["loss"] == x["loss"] for x in trained)  # finite, no NaN
    assert "rewards/margins" in trained[-1]  # TRL's own DPO metrics reach metrics.jsonl
    assert json.loads((run / "config.json").read_text())["method"] == "dpo"


def test_dpo_raises_the_preference_accuracy_and_eval_reports_it(dpo_run, capsys):
    """The trained adapter prefers the chosen answers more than the base (adapter disabled)
    does: what DPO optimises, measured on the training pairs."""
    from tunefix.train.evaluate import preference_accuracy
    from tunefix.train.preference import load_preference_rows, preference_rows
    from tunefix.train.run import load_run

    cfg, _ = dpo_run
    model, tok, _, _ = load_run(cfg.output_dir)
    rows = preference_rows(dataclasses.replace(cfg, eval_fraction=0.0), tok, load_preference_rows(cfg))[1]
    trained = preference_accuracy(model, rows)
    with model.disable_adapter():
        base = preference_accuracy(model, rows)
    assert trained.margin > base.margin + 0.5, (trained, base)
    assert main(["eval", cfg.output_dir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 3 and 0 <= out["preference_accuracy"] <= 1 and "base_preference_accuracy" in out


def test_dpo_reference_is_the_fixed_base_with_the_adapter_disabled(tmp_path):
    """TRL gets the LoRA config (no second adapter, no second load) and its precomputed
    reference log-probabilities are the base model's own."""
    from datasets import Dataset

    from tunefix.train import trainer as T
    from tunefix.train.evaluate import answer_logps
    from tunefix.train.preference import load_preference_rows, preference_rows, trl_arguments

    cfg = _dpo(tmp_path, max_steps=1)
    cfg.validate()
    model, tok, _ = T._load_model(cfg, T.Silent())
    _, rows, _, _ = preference_rows(cfg, tok, load_preference_rows(cfg))
    base = [answer_logps(model, r["prompt_ids"], r["chosen_ids"]) for r in rows[:3]]
    run_dir, _, _ = T._open_run_dir(cfg)
    model, peft = T._trainable_on_trl(cfg, model)
    trainer, _, _ = T._build_trainer(cfg, model, tok, trl_arguments(cfg, run_dir, False, tok), rows, [],
                                     allocator=None, progress=T.Silent(), peft_config=peft)
    assert list(trainer.model.peft_config) == ["default"]
    assert isinstance(trainer.train_dataset, Dataset)
    ref = trainer.train_dataset["ref_chosen_logps"][:3]
    assert torch.allclose(torch.tensor(ref), torch.tensor(base), atol=0.02), (ref, base)  # bf16 autocast


def test_dpo_stage_on_an_sft_run_and_resume(tmp_path):
    """A DPO stage starts from a finished SFT run (its adapter merged); a run stopped after
    its checkpoint resumes to the same number of steps; a finished run is never overwritten."""
    from tunefix.errors import TunefixError
    from tunefix.train.trainer import train

    sft = RunConfig(model=str(tiny.tiny_model("llama")), data=str(EXAMPLES / "alpaca_sample.json"),
                    template="llama-3", output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=2,
                    gradient_accumulation=1, report_to="none", limit_rows=4)
    train(sft)
    first = train(_dpo(tmp_path, model=sft.output_dir, max_steps=2, save_steps=1))
    assert first.steps == 2 and json.loads((Path(first.run_dir) / "summary.json").read_text())["base_model"] == sft.output_dir
    with pytest.raises(TunefixError, match="already"):
        train(_dpo(tmp_path, model=sft.output_dir, max_steps=2))
    resumed = train(_dpo(tmp_path, model=sft.output_dir, max_steps=3, save_steps=1, resume=True))
    assert resumed.steps == 3
