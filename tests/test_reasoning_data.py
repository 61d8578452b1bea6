"""Reasoning in the data: rows that carry it (JSON, a CSV column), the preview's marks, and
reasoning templates that render history otherwise than at inference (issue 18): each assistant
turn trained after exactly the prompt the real template gives it, and the doctor's
``reasoning-in-history``."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tunefix import assets, tiny
from tunefix.commands.data import PreviewOptions, run_preview
from tunefix.data import IGNORE, prepare, tokenize_conversation, tokenize_rows
from tunefix.data.history import changed_turns, prefix_stable
from tunefix.data.preview import THINK_CLOSE, THINK_OPEN, preview
from tunefix.doctor import examine
from tunefix.templates import template_for
from tunefix.templates.policy import prompt_ids, render

QWEN3 = "Qwen-Qwen3-0.6B"
CONV = [{"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "42.", "reasoning": "Six sevens make 42."},
        {"role": "user", "content": "And 6 x 8?"},
        {"role": "assistant", "content": "48.", "reasoning": "One more six: 48."}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(assets.tokenizer("qwen2"))  # Qwen3's vocabulary


def _real(name: str) -> str:
    return str(assets.chat_templates() / f"{name}.jinja")


@pytest.fixture(scope="module")
def qwen3(tok):
    return template_for(tok, _real(QWEN3))


# ---------------------------------------------------------------------- rows with reasoning


def test_json_rows_carry_reasoning_under_every_spelling(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q", "reasoning": "never on a user turn"},
                          {"role": "assistant", "content": " a1 ", "reasoning_content": "\n r1 \n"},
                          {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "a2", "thinking": "r2"}]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "reasoning": "r", "thinking": "ignored"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": ""}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = prepare(path).rows
    assert got[0] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1", "reasoning": "r1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning": "r2"}]
    assert got[1][1] == {"role": "assistant", "content": "a", "reasoning": "r"}  # tunefix's own key first
    assert got[2][1] == {"role": "assistant", "content": "a"}  # empty reasoning: none


def test_csv_merge_maps_a_column_to_reasoning(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question,why,answer\nWhat is 6 x 7?,Six sevens.,42\nAnd 2 + 2?,,4\n")
    rows = prepare(path, merge="{question}", output="answer", reasoning="why").rows
    assert rows[0] == [{"role": "user", "content": "What is 6 x 7?"},
                       {"role": "assistant", "content": "42", "reasoning": "Six sevens."}]
    assert rows[1][1] == {"role": "assistant", "content": "4"}  # empty cell: no reasoning
    # Without --merge, the answer's columns (reasoning included) stay out of the prompt.
    rows = prepare(path, output="answer", reasoning="Because: {why}").rows
    assert rows[0][0]["content"] == "question: What is 6 x 7?"
    assert rows[0][1]["reasoning"] == "Because: Six sevens."


def test_run_config_and_preview_options_take_the_mapping():
    import argparse

    from tunefix.commands.build import add_arguments, options_from
    from tunefix.train.config import load_config

    cfg = load_config(overrides=["reasoning=why", "--train-turns", "last"])
    assert (cfg.reasoning, cfg.train_turns) == ("why", "last")
    parser = argparse.ArgumentParser()
    add_arguments(parser, PreviewOptions)
    opts = options_from(PreviewOptions, parser.parse_args(["f.csv", "--reasoning", "{why}", "--train-turns", "last"]))
    assert (opts.reasoning, opts.train_turns) == ("{why}", "last")
    with pytest.raises(SystemExit):  # a choice outside auto, per-turn, last
        parser.parse_args(["f.csv", "--train-turns", "every"])


# --------------------------------------------------------------- prefix stability, measured


@pytest.mark.parametrize("name", [QWEN3, "Qwen3.5-4B", "Qwen-QwQ-32B"])
def test_reasoning_templates_are_not_prefix_stable(tok, name):
    assert not prefix_stable(tok, assets.chat_template(name))


def test_history_measure(tok):
    # The real Qwen3 template drops turn 1's reasoning once turn 2 follows.
    assert changed_turns(tok, assets.chat_template(QWEN3), CONV) == [1]
    assert prefix_stable(tok, template_for(tok, "chatml"))
    assert prefix_stable(tok, assets.chat_template("Qwen-Qwen2.5-7B-Instruct"))


# ----------------------------------------------------------- per-turn sequences, token ids


def test_qwen3_multi_turn_row_is_one_sequence_per_turn(tok, qwen3):
    out = tokenize_rows(tok, qwen3, [CONV])
    assert out.history == "per-turn" and out.source == [0, 0] and len(out.rows) == 2
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for row, end in zip(out.rows, (2, 4), strict=True):
        text = render(tok, qwen3, CONV[:end])  # the template's own rendering of the prefix
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        prompt = prompt_ids(tok, qwen3, CONV[:end - 1])  # what inference feeds before this turn
        assert row["input_ids"][:len(prompt)] == prompt
        stop = row["input_ids"].index(eot, len(prompt))
        expected = [IGNORE] * len(prompt) + row["input_ids"][len(prompt):stop + 1]
        assert row["labels"] == expected + [IGNORE] * (len(row["input_ids"]) - stop - 1)
        trained = tok.decode([t for t in row["labels"] if t != IGNORE])
        assert trained == f"<think>\n{CONV[end - 1]['reasoning']}\n</think>\n\n{CONV[end - 1]['content']}<|im_end|>"
    # History as at inference: turn 1's reasoning is in its own sequence, not in turn 2's.
    assert "Six sevens" in tok.decode(out.rows[0]["input_ids"])
    assert "Six sevens" not in tok.decode(out.rows[1]["input_ids"])


def test_qwen3_last_turn_only_and_turns_without_reasoning(tok, qwen3):
    last = tokenize_rows(tok, qwen3, [CONV], turns="last")
    per_turn = tokenize_rows(tok, qwen3, [CONV])
    assert last.history == "last" and last.rows == per_turn.rows[1:]
    # Without reasoning the template still writes an empty think block on the latest turn
    # only: that block is what the model produces after the prompt, so it is trained.
    plain = [{k: v for k, v in m.items() if k != "reasoning"} for m in CONV]
    row = tokenize_rows(tok, qwen3, [plain]).rows[0]
    assert tok.decode([t for t in row["labels"] if t != IGNORE]) == "<think>\n\n</think>\n\n42.<|im_end|>"


def test_qwen35_turn_is_tokenised_after_exactly_its_inference_prompt(tok):
    qwen35 = template_for(tok, _real("Qwen3.5-4B"))
    plain = [{k: v for k, v in m.items() if k != "reasoning"} for m in CONV]
    out = tokenize_rows(tok, qwen35, [plain])
    assert out.history == "per-turn"
    for row, end in zip(out.rows, (2, 4), strict=True):
        prompt = prompt_ids(tok, qwen35, plain[:end - 1])  # ends "<think>\n"
        assert row["input_ids"][:len(prompt)] == prompt
        assert tok.decode([t for t in row["labels"] if t != IGNORE]).startswith("\n</think>\n\n")
    # One tokenisation of the row would merge the prompt's last "\n" with the turn's first.
    whole = tok(render(tok, qwen35, plain[:2]), add_special_tokens=False)["input_ids"]
    assert whole[:len(prompt_ids(tok, qwen35, plain[:1]))] != prompt_ids(tok, qwen35, plain[:1])


def test_prefix_stable_template_keeps_one_sequence_per_row(tok):
    chatml = template_for(tok, "chatml")
    plain = [{k: v for k, v in m.items() if k != "reasoning"} for m in CONV]
    out = tokenize_rows(tok, chatml, [plain, plain[:2]])
    assert out.history == "whole" and out.source == [0, 1]
    assert out.rows == [tokenize_conversation(tok, chatml, plain), tokenize_conversation(tok, chatml, plain[:2])]
    # chatml has no place for reasoning: said, not silently trained on something else.
    assert tokenize_rows(tok, chatml, [CONV]).reasoning_dropped == 2


# -------------------------------------------------------------------------------- preview


def test_preview_marks_reasoning_and_says_it_is_trained(tok, tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n")
    p = preview(str(path), template=_real(QWEN3), model=str(assets.tokenizer("qwen2")))
    assert p.done.history == "per-turn" and "reasoning in history" in p.history_line()
    run_preview(PreviewOptions(file=str(path), template=_real(QWEN3), model=str(assets.tokenizer("qwen2"))))
    out = capsys.readouterr().out
    assert "row 1, sequence 1 of 2" in out and "row 1, sequence 2 of 2" in out
    assert f"⟦<think>\n{THINK_OPEN}Six sevens make 42.{THINK_CLOSE}\n</think>\n\n42.<|im_end|>⟧" in out
    assert f"⟦<think>\n{THINK_OPEN}One more six: 48.{THINK_CLOSE}\n</think>\n\n48.<|im_end|>⟧" in out
    assert out.count(f"reasoning {THINK_OPEN} {THINK_CLOSE}: 1 trained") == 2
    # A template without a place for reasoning: the preview says it is dropped.
    run_preview(PreviewOptions(file=str(path), template="chatml", model=str(assets.tokenizer("qwen2"))))
    out = capsys.readouterr().out
    assert "2 dropped by the template (not trained)" in out and THINK_OPEN + "Six" not in out


# --------------------------------------------------------------------------------- doctor


def test_doctor_reasoning_in_history_both_ways():
    model = tiny.tiny_model("qwen2")
    f = examine(model, template=_real(QWEN3)).get("reasoning-in-history")
    assert f is not None and f.severity == "warning"
    assert "<think>" in f.evidence["turn_when_latest"] and "<think>" not in f.evidence["same_turn_in_history"]
    assert "sequence of its own" in f.fix
    assert examine(model, template="chatml").get("reasoning-in-history") is None
