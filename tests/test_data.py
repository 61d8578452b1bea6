"""Data: loading with clear errors, formats, column merging, labels on real tokenizers, packing."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunefix import assets
from tunefix.cli import main
from tunefix.data import IGNORE, pack, prepare, tokenize_rows
from tunefix.data.merge import parse_merge
from tunefix.errors import TunefixError
from tunefix.templates import template_for

TITANIC = Path(__file__).resolve().parents[1] / "examples" / "titanic.csv"
MERGE = "{sex}, {age} years old[[, deck {deck}]], travelling {class} class from {embark_town}"
MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who wrote Faust?"},
    {"role": "assistant", "content": "Goethe, in two parts."},
    {"role": "user", "content": "And\nwhen?"},
    {"role": "assistant", "content": "1808 and 1832 — café!"},
]


def test_titanic_gives_891_conversations_without_empty_decks():
    p = prepare(TITANIC, merge=MERGE, output="alive")
    assert p.format == "table" and len(p.rows) == 891
    users = [c[0]["content"] for c in p.rows]
    assert sum("deck" in u for u in users) == 203  # the rows whose deck is known
    assert all("None" not in u and "nan" not in u for u in users)
    assert {c[1]["content"] for c in p.rows} == {"yes", "no"}


def test_preview_shows_masked_prompt_and_trained_answer(capsys):
    rc = main(["data", "preview", str(TITANIC), "--merge", MERGE, "--output", "{alive}", "--rows", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "male, 22.0 years old, travelling Third class from Southampton<|im_end|>" in out
    assert "⟦no<|im_end|>⟧" in out and "⟦yes<|im_end|>⟧" in out
    assert "891 rows kept, 0 truncated" in out and "0 dropped" in out


@pytest.mark.parametrize("vocab, template", [("llama-bpe", "llama-3"), ("llama-spm", "mistral"),
                                             ("phi-3", "phi-3"), ("qwen2", "qwen-2.5"),
                                             ("phi-3", None), ("qwen2", None)])
def test_labels_are_exactly_the_answers_and_their_end_of_turn(vocab, template):
    tok = AutoTokenizer.from_pretrained(assets.tokenizer(vocab))
    t = template_for(tok, template)
    conv = MULTI_TURN if template else MULTI_TURN[1:]  # the real Phi-3 template drops system
    row = tokenize_rows(tok, t, [conv]).rows[0]
    runs = [[i for i, _ in g] for trained, g in
            itertools.groupby(zip(row["input_ids"], row["labels"], strict=True), key=lambda x: x[1] != IGNORE)
            if trained]
    answers = [m["content"] + t.eot for m in conv if m["role"] == "assistant"]
    assert [tok.decode(r).strip() for r in runs] == answers


def test_truncation_and_dropped_rows_are_counted():
    tok = AutoTokenizer.from_pretrained(assets.tokenizer("qwen2"))
    t = template_for(tok, "chatml")
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a " * 40}]
    done = tokenize_rows(tok, t, [long_prompt, short, MULTI_TURN[1:3]], max_seq_length=30)
    assert (done.truncated, done.dropped, len(done.rows)) == (2, 1, 2)
    assert all(len(r["input_ids"]) <= 30 for r in done.rows)


def test_packing_keeps_rows_apart():
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 4, 6, 3)]
    packs = pack(rows, 10)
    assert [p["seq_lens"] for p in packs] == [[5, 4], [6, 3]]
    assert packs[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packs[0]["labels"][5] == IGNORE and packs[0]["labels"][0] == IGNORE


def _write(tmp_path: Path, name: str, rows) -> Path:
    f = tmp_path / name
    if name.endswith(".jsonl"):
        f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        f.write_text(json.dumps(rows))
    return f


@pytest.mark.parametrize("name, rows, fmt", [
    ("a.json", [{"instruction": "Add", "input": "2 and 2", "output": "4"}], "alpaca"),
    ("s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
     "sharegpt"),
    ("o.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     "openai"),
    ("p.json", [{"prompt": "hi", "completion": "yo"}], "prompt-completion"),
    ("t.jsonl", [{"text": "Once upon a time."}], "text"),
])
def test_formats_are_detected_and_standardised(tmp_path, name, rows, fmt):
    p = prepare(_write(tmp_path, name, rows))
    assert p.format == fmt
    if fmt == "text":
        assert p.rows == ["Once upon a time."]
    else:
        assert p.rows[0][-1]["role"] == "assistant" and p.rows[0][0]["role"] == "user"
    if fmt == "alpaca":
        assert p.rows[0][0]["content"] == "Add\n\n2 and 2"


def test_merge_sections_and_literal_braces():
    m = parse_merge("{a}[[ and {b}]] {{x}}", ["a", "b"])
    assert m.fill({"a": "A", "b": None}) == "A {x}"
    assert m.fill({"a": "A", "b": float("nan")}) == "A {x}"
    assert m.fill({"a": "A", "b": "B"}) == "A and B {x}"


def test_conversation_extension_joins_rows():
    p = prepare(TITANIC, merge=MERGE, output="alive", system="Predict.", turns=3)
    assert len(p.rows) == 297 and len(p.rows[0]) == 7
    assert sum(m["role"] == "system" for m in p.rows[0]) == 1


@pytest.mark.parametrize("content, args, needle", [
    ("a,b\n1,2\n", ["--merge", "{a} {nope}", "--output", "b"], "unknown column 'nope'"),
    ("", ["--output", "b"], "empty"),
    ("a,b\n1,2\n3,4,5\n", ["--output", "b"], "bad.csv:3: 3 fields where the header has 2"),
    (b"a,b\n1,caf\xe9\n", ["--output", "b"], "bad.csv:2: not UTF-8"),
    ('[{"foo": 1, "bar": 2}]', [], "no known format in columns foo, bar"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, content, args, needle):
    f = tmp_path / ("bad.json" if content[:1] in ("[", b"[") else "bad.csv")
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc = main(["data", "preview", str(f), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "hi", "completion": "yo"}]).save_to_disk(tmp_path / "ds")
    assert prepare(tmp_path / "ds").rows == [[{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]]


def test_missing_output_column_lists_columns():
    with pytest.raises(TunefixError) as err:
        prepare(TITANIC, merge=MERGE)
    assert "Available columns: survived" in err.value.one_line()


def test_tsv_and_parquet_load_like_csv(tmp_path):
    import pandas as pd

    from tunefix.data import prepare

    rows = [{"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"}]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.tsv", "d.parquet"):
        prepared = prepare(tmp_path / name)
        assert prepared.format == "alpaca" and len(prepared.rows) == 2, name
        assert prepared.rows[1][-1] == {"role": "assistant", "content": "5"}


def test_hub_dataset_from_the_local_cache(tmp_path, monkeypatch):
    from tunefix.data import prepare
    from tunefix.errors import TunefixError

    # The layout huggingface_hub gives a downloaded dataset repository.
    repo = tmp_path / "hub" / "datasets--acme--tiny"
    (repo / "snapshots" / "abc123" / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "data" / "train.csv").write_text("prompt,completion\nhi,hello\n2+2,4\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    prepared = prepare("acme/tiny")
    assert prepared.format == "prompt-completion" and len(prepared.rows) == 2
    with pytest.raises(TunefixError, match="not a dataset in the local Hugging Face cache"):
        prepare("acme/missing")


def test_loading_a_local_file_reaches_no_network(tmp_path, monkeypatch):
    # datasets pings a download counter on S3 for every load_dataset unless told not to.
    import socket

    from tunefix.data.load import load_table

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args[:2])
        raise OSError("network disabled in this test")

    import datasets
    import datasets.load

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # As for a user (the tests run with HF_HUB_OFFLINE=1, see conftest.py, and the hub
    # client refuses offline before any socket): count the HTTP session's use as well.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(datasets.load, "get_session", lambda: no_network("http session"))
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nhi,hello\n")
    assert len(load_table(path)) == 1
    assert calls == []
