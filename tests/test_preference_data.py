"""Preference data: loading pairs, KTO rows and GRPO prompts with clear errors, and the seam
test: what TRL's own collators build from tunefix's ids is tunefix's tokenisation of the whole
conversation, on every tiny family (tokenizers only, no model weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from tunefix import tiny
from tunefix.cli import main
from tunefix.data import tokenize_rows
from tunefix.data.preference import (
    load_preference,
    tokenize_answer,
    tokenize_kto,
    tokenize_pairs,
    tokenize_prompts,
)
from tunefix.errors import TunefixError
from tunefix.templates import end_of_turn, policy, template_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIRS = EXAMPLES / "pairs_sample.jsonl"
TITANIC = EXAMPLES / "titanic.csv"
PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
CHOSEN = {"role": "assistant", "content": "It is 6, of course!"}
REJECTED = {"role": "assistant", "content": "7"}  # a digit: SentencePiece's separate "▁" before it


def _jsonl(tmp_path: Path, rows: list[dict], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- loading


def test_pairs_from_messages_in_trl_explicit_and_implicit_prompt_layouts(tmp_path):
    rows = load_preference(PAIRS, "pairs")
    assert len(rows.rows) == 10 and not rows.text
    first = rows.rows[0]
    assert first["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert first["chosen"] == {"role": "assistant", "content": "Paris."}
    assert rows.rows[1]["prompt"][0]["role"] == "system"
    # TRL's implicit prompt: chosen and rejected are whole conversations sharing the prompt.
    user = {"role": "user", "content": "Hi"}
    implicit = _jsonl(tmp_path, [{"chosen": [user, {"role": "assistant", "content": "Hello!"}],
                                  "rejected": [user, {"role": "assistant", "content": "Go away."}]}])
    got = load_preference(implicit, "pairs", system="Be kind.").rows[0]
    assert got["prompt"] == [{"role": "system", "content": "Be kind."}, user]
    assert got["rejected"]["content"] == "Go away."


def test_text_pairs_are_kept_as_written_and_train_as_prompt_answer_eos(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}])
    rows = load_preference(path, "pairs")
    assert rows.text and rows.rows[0]["chosen"]["content"] == " 4"
    tok = AutoTokenizer.from_pretrained(str(tiny.tiny_model("llama")))
    (row,), stats = tokenize_pairs(tok, None, rows.rows)
    assert row["prompt_ids"][0] == tok.bos_token_id and row["prompt_ids"][1] != tok.bos_token_id
    assert row["chosen_ids"] == tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert load_preference(path, "pairs", system="S").text is False  # a system prompt means a chat


def test_csv_pairs_with_merge_and_optional_sections():
    rows = load_preference(TITANIC, "pairs", merge="{sex}, {age} years old[[, deck {deck}]]",
                           chosen="{alive}", rejected="the opposite of {alive}", limit=12)
    prompts = [r["prompt"][0]["content"] for r in rows.rows]
    assert len(rows.rows) == 12 and not rows.text
    assert any("deck" in p for p in prompts) and any("deck" not in p for p in prompts)
    assert all("None" not in p and "nan" not in p for p in prompts)
    assert rows.rows[0]["chosen"]["content"] in ("yes", "no")
    assert rows.rows[0]["rejected"]["content"].startswith("the opposite of ")


def test_kto_labels_in_every_spelling(tmp_path):
    labels = [True, 0, 1, "false", "Desirable", "undesirable", "1"]
    path = _jsonl(tmp_path, [{"prompt": "p", "completion": "c", "label": v} for v in labels])
    rows = load_preference(path, "kto")
    assert [r["label"] for r in rows.rows] == [True, False, True, False, True, False, True]
    assert rows.rows[0]["completion"] == {"role": "assistant", "content": "c"}
    table = load_preference(TITANIC, "kto", merge="{sex}, {age}", output="{alive}", label="adult_male", limit=5)
    assert {r["label"] for r in table.rows} <= {True, False}


def test_grpo_prompts_keep_every_other_column_for_the_rewards():
    rows = load_preference(TITANIC, "prompts", merge="{sex}, {age} years old", limit=3)
    first = rows.rows[0]
    assert first["prompt"] == [{"role": "user", "content": "male, 22.0 years old"}]
    assert first["alive"] == "no" and "embark_town" in first  # the truth, for an exact-match reward
    tok = AutoTokenizer.from_pretrained(str(tiny.tiny_model("qwen2")))
    template = template_for(tok, "qwen-2.5")
    done, stats = tokenize_prompts(tok, template, rows.rows, max_seq_length=64)
    assert done[0]["prompt_ids"] == policy.prompt_ids(tok, template, first["prompt"]) and done[0]["alive"] == "no"
    assert stats.dropped == 0 and tokenize_prompts(tok, template, rows.rows, max_seq_length=5)[1].dropped == 3


@pytest.mark.parametrize("rows, kind, expected", [
    ([{"prompt": "p", "chosen": "a"}], "pairs", "needs a 'rejected' column"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "  "}],
     "pairs", "row 2: the rejected answer is empty"),
    ([{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}], "pairs",
     "row 1: the chosen conversation ends with a user message"),
    ([{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}], "pairs",
     "differ before their last message"),
    ([{"prompt": "", "chosen": "a", "rejected": "b"}], "pairs", "row 1: the prompt is empty"),
    ([{"prompt": "p", "completion": "c", "label": "maybe"}], "kto", "row 1: the label 'maybe'"),
    ([{"prompt": "p", "completion": "", "label": True}], "kto", "row 1: the completion answer is empty"),
    ([{"prompt": "p", "completion": "c"}], "kto", "needs a 'label' column"),
    ([{"question": "p"}], "prompts", "needs a 'prompt' column"),
])
def test_bad_rows_are_refused_in_one_line_naming_the_row(tmp_path, rows, kind, expected):
    with pytest.raises(TunefixError, match=expected) as e:
        load_preference(_jsonl(tmp_path, rows), kind)
    assert "\n" not in str(e.value) and e.value.hint


def test_options_that_do_not_fit_the_kind_are_refused():
    with pytest.raises(TunefixError, match="--chosen does not apply to kto"):
        load_preference(TITANIC, "kto", chosen="alive")
    with pytest.raises(TunefixError, match="unknown column 'nope'"):
        load_preference(TITANIC, "pairs", chosen="{nope}", rejected="alive")
    with pytest.raises(TunefixError, match="unknown preference data kind"):
        load_preference(TITANIC, "sft")


# ----------------------------------------------------------------------------- the seam

_TOKS: dict[str, object] = {}


def _tok(family: str):
    """One tokenizer per distinct tokenizer asset (families share them; loading is the cost)."""
    key = tiny.FAMILIES[family].tokenizer
    if key not in _TOKS:
        _TOKS[key] = AutoTokenizer.from_pretrained(str(tiny.tiny_model(family)))
    return _TOKS[key]


# (family, template): every tiny family with the template its tests train on, and the thinking
# templates with a reasoned answer (the think block sits between the prompt and the answer).
CASES = [(f, spec.template, False) for f, spec in tiny.FAMILIES.items()] + [
    ("qwen3", "qwen-3", True), ("qwen3_5", "qwen-3.5", True), ("gemma4", "gemma-4-think", True),
    ("gpt_oss", "gpt-oss", True)]


def _sft_reference(tok, template, prompt, answer, n_prompt):
    """tunefix's SFT tokenisation of prompt + answer (the default path), up to its last scored
    token, and the positions it scores in the last answer (earlier turns are prompt here)."""
    row = tokenize_rows(tok, template, [[*prompt, answer]]).rows[-1]
    scored = [k for k, t in enumerate(row["labels"]) if t != policy.IGNORE and k >= n_prompt]
    return row["input_ids"][:scored[-1] + 1], scored


@pytest.mark.parametrize("family, name, reasoned", CASES)
def test_trl_collators_train_exactly_what_tunefix_renders(family, name, reasoned):
    tok, template = _tok(family), None
    template = template_for(tok, name)
    prompt = PROMPT if family != "gpt_oss" or reasoned else PROMPT[1:]  # zephyr via o200k: no system needed
    chosen = dict(CHOSEN, reasoning="Three and three make six.") if reasoned else CHOSEN
    rejected = dict(REJECTED, reasoning="A guess.") if reasoned else REJECTED
    (pair,), _ = tokenize_pairs(tok, template, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id or 0)([pair])
    kto = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id or 0)(
        tokenize_kto(tok, template, [{"prompt": prompt, "completion": rejected, "label": False}])[0])
    n_prompt = len(policy.prompt_ids(tok, template, prompt))
    assert pair["prompt_ids"] == policy.prompt_ids(tok, template, prompt)
    eot = policy.token_id(tok, end_of_turn(template, tok))
    bos = policy.bos_id(tok)
    rows = [(batch, 0, chosen), (batch, 1, rejected), (kto, 0, rejected)]
    for collated, k, answer in rows:
        width = int(collated["attention_mask"][k].sum())
        ids = collated["input_ids"][k][:width].tolist()
        mask = collated["completion_mask"][k][:width].tolist()
        want, scored = _sft_reference(tok, template, prompt, answer, n_prompt)
        assert ids == want, (family, name, tok.convert_ids_to_tokens(ids[n_prompt - 2:]),
                             tok.convert_ids_to_tokens(want[n_prompt - 2:]))
        trained = [i for i, m in enumerate(mask) if m]
        # SFT's labels, plus what the template writes between the prompt and the answer's text
        # (Mistral's space, a SentencePiece "▁" before a digit): the model generates it first.
        separator = list(range(n_prompt, scored[0]))
        assert trained == separator + scored, (family, name)
        assert not tok.decode([ids[i] for i in separator]).strip(), (family, name)
        assert ids[-1] == eot  # the answer ends with the end-of-turn token, scored
        if bos is not None:
            assert ids[0] == bos and bos not in ids[1:], (family, name)
        assert sum(x == bos for x in ids) == (bos is not None)


def test_tokenising_the_answer_after_the_prompt_matches_inference():
    """The prompt's ids are the inference prompt and the answer never re-tokenises the prompt's
    end (TRL's own path diverges on Gemma 4, whose prompt opens an empty thought channel)."""
    tok = _tok("gemma4")
    template = template_for(tok, "gemma-4")
    enc = tokenize_answer(tok, template, PROMPT[1:2], {"role": "assistant", "content": "4"})
    assert enc["prompt_ids"] == policy.prompt_ids(tok, template, PROMPT[1:2])
    assert tok.decode(enc["completion_ids"]).startswith("4")


def test_truncation_keeps_the_prompt_and_cuts_answers_or_drops_rows():
    tok = _tok("qwen2")
    template = template_for(tok, "qwen-2.5")
    row = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    (full,), _ = tokenize_pairs(tok, template, [row])
    n = len(full["prompt_ids"])
    (cut,), stats = tokenize_pairs(tok, template, [row], max_seq_length=n + 2)
    assert cut["prompt_ids"] == full["prompt_ids"] and cut["chosen_ids"] == full["chosen_ids"][:2]
    assert cut["rejected_ids"] == full["rejected_ids"][:2] and stats.truncated == 1
    done, stats = tokenize_pairs(tok, template, [row, row], max_seq_length=n)
    assert done == [] and stats.dropped == 2
    # TRL's collator at the same max_length (its default keep_start) changes nothing more.
    batch = DataCollatorForPreference(pad_token_id=0, max_length=n + 2)([cut])
    assert batch["input_ids"][0].tolist() == cut["prompt_ids"] + cut["chosen_ids"]


# ---------------------------------------------------------------------------- preview


def test_preview_of_pairs_shows_chosen_and_rejected_as_trained(capsys):
    model = str(tiny.tiny_model("qwen2"))
    assert main(["data", "preview", str(PAIRS), "--method", "dpo", "--model", model, "--template", "qwen-2.5",
                 "--rows", "2", "--max-seq-length", "36", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert "--- row 1, chosen" in out and "--- row 1, rejected" in out
    assert "⟦Paris.<|im_end|>⟧" in out and "⟦Lyon.<|im_end|>⟧" in out
    assert "<|im_start|>assistant\n⟦" in out  # the prompt is not trained
    assert "total: 10 rows kept, 2 truncated to 36, 0 dropped" in out  # rows 2 and 7


def test_preview_of_kto_and_grpo(capsys, tmp_path):
    model = str(tiny.tiny_model("qwen2"))
    path = _jsonl(tmp_path, [{"prompt": "Hi", "completion": "Hello!", "label": "desirable"}])
    assert main(["data", "preview", str(path), "--method", "kto", "--model", model]) == 0
    assert "completion, label desirable" in capsys.readouterr().out
    assert main(["data", "preview", str(TITANIC), "--method", "grpo", "--merge", "{sex}, {age}",
                 "--model", model, "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "male, 22.0<|im_end|>" in out and "⟦" not in out.split("\n", 1)[1] and "total: 891 rows kept" in out


def test_preview_refuses_an_empty_answer_in_one_line(capsys, tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "Hi", "chosen": "Hello!", "rejected": ""}])
    assert main(["data", "preview", str(path), "--method", "dpo"]) == 2
    assert "row 1: the rejected answer is empty" in capsys.readouterr().err
