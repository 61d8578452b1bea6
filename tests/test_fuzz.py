"""Issue 9: property-based fuzzing. Whatever the input, the loaders, the merge-template
parser, the custom-template builder and the format detector either succeed or raise a
TunefixError; no other exception escapes.

Each property runs 1,000 examples. The file loaders are fuzzed through their pre-checks
(the standard-library checks that run before ``datasets`` sees a file; they decide what a
bad file's error says), plus a smaller number of complete loads through ``datasets``
(one load costs ~50 ms, too slow for 1,000 of each kind).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunefix.errors import TunefixError

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
FULL_LOADS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# Text that looks like tables, JSON and templates: their syntax characters, often.
SYNTAX = st.sampled_from(list(',;\t\n\r"\'{}[]:\\ ') + ["{{", "}}", "[[", "]]", "\r\n", '""', "{INPUT}",
                                                         "{OUTPUT}", "{SYSTEM}", "null", "true", "1e999",
                                                         "\ufeff", "\x00", "é", "☃"])
TEXTISH = st.lists(st.one_of(SYNTAX, st.text(max_size=6)), max_size=40).map("".join)
BYTESISH = st.one_of(st.binary(max_size=300), TEXTISH.map(lambda t: t.encode("utf-8")),
                     TEXTISH.map(lambda t: t.encode("utf-8", "ignore") + b"\xff\xfe"))
SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet"]

_DIR = Path(tempfile.mkdtemp(prefix="tunefix-fuzz-"))


def _file(data: bytes, suffix: str) -> Path:
    _DIR.mkdir(parents=True, exist_ok=True)  # another test may have cleaned /tmp meanwhile
    path = _DIR / f"data{suffix}"
    path.write_bytes(data)
    return path


def _only_clean_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TunefixError as e:
        line = e.one_line()
        assert line and "\n" not in line
        return None


# ------------------------------------------------------------------ loaders


@FUZZ
@given(data=BYTESISH, suffix=st.sampled_from(SUFFIXES))
def test_loader_prechecks_raise_only_tunefix_errors(data, suffix):
    from tunefix.data import load

    path = _file(data, suffix)
    kind = load._kind(path, None)
    if kind in ("csv", "tsv"):
        _only_clean_errors(load._check_table, path, "," if kind == "csv" else "\t")
    elif kind in ("json", "jsonl"):
        _only_clean_errors(load._check_json, path, kind)
    elif kind == "parquet":
        _only_clean_errors(load._check_parquet, path)
    else:
        _only_clean_errors(load._text, path)


CSVISH = st.lists(st.lists(st.one_of(st.sampled_from(["", "a", "b", "x,y", '"q"', "1", "é", "{a}", " "]),
                                     st.text(max_size=4)), min_size=1, max_size=4),
                  min_size=0, max_size=6).map(lambda rows: "\n".join(",".join(r) for r in rows))


@FULL_LOADS
@given(text=CSVISH)
def test_full_csv_loads_through_datasets(text):
    import datasets

    from tunefix.data import load_table

    datasets.disable_progress_bars()
    ds = _only_clean_errors(load_table, _file(text.encode("utf-8"), ".csv"))
    if ds is not None:
        assert len(ds) >= 1


@FULL_LOADS
@given(data=BYTESISH, suffix=st.sampled_from([".json", ".jsonl"]))
def test_full_json_prepare(data, suffix):
    import datasets

    from tunefix.data import prepare

    datasets.disable_progress_bars()
    _only_clean_errors(prepare, _file(data, suffix))


JSON_ROWS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                         lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                 st.dictionaries(st.sampled_from(
                                                     ["role", "content", "from", "value", "messages",
                                                      "instruction", "output", "input", "text", "prompt",
                                                      "completion", "x"]), inner, max_size=4)),
                         max_leaves=12)


@FULL_LOADS
@given(rows=st.lists(st.dictionaries(st.sampled_from(["messages", "conversations", "instruction", "output",
                                                       "input", "text", "prompt", "completion", "x"]),
                                      JSON_ROWS, min_size=1, max_size=3), min_size=1, max_size=3))
def test_structured_json_prepare(rows):
    import json

    import datasets

    from tunefix.data import prepare

    datasets.disable_progress_bars()
    _only_clean_errors(prepare, _file(json.dumps(rows).encode(), ".json"))


# ------------------------------------------------------------------ format detection and conversion


@FUZZ
@given(columns=st.lists(st.sampled_from(["messages", "conversations", "conversation", "instruction", "output",
                                         "input", "prompt", "completion", "response", "text", "x"]),
                        max_size=5, unique=True),
       rows=st.lists(st.dictionaries(st.sampled_from(["messages", "conversations", "conversation",
                                                      "instruction", "output", "text", "x"]),
                                     JSON_ROWS, max_size=4), max_size=4))
def test_format_detector_and_converters(columns, rows):
    from tunefix.data.formats import converter, detect_format

    fmt = _only_clean_errors(detect_format, columns, rows)
    assert fmt is None or isinstance(fmt, str)
    if fmt is not None and fmt != "text":
        convert = converter(fmt, columns)
        for row in rows:
            conv = _only_clean_errors(convert, row)
            assert conv is None or all(m["role"] in ("system", "user", "assistant") for m in conv)


# ------------------------------------------------------------------ merge templates


@FUZZ
@given(source=TEXTISH, columns=st.lists(st.sampled_from(["a", "b", "sex", "age", "", " ", "{", "]]"]),
                                        max_size=4, unique=True),
       row_values=st.lists(st.one_of(st.none(), st.text(max_size=4), st.floats(allow_nan=True), st.integers()),
                           min_size=8, max_size=8))
def test_merge_template_parser(source, columns, row_values):
    from tunefix.data.merge import output_template, parse_merge

    tpl = _only_clean_errors(parse_merge, source, columns)
    if tpl is not None:
        row = dict(zip(columns, row_values, strict=False))
        assert isinstance(tpl.fill(row), str)
    _only_clean_errors(output_template, source, columns)


# ------------------------------------------------------------------ custom templates


PIECES = st.sampled_from(["{INPUT}", "{OUTPUT}", "{SYSTEM}", "<|user|>", "<|end|>", "<|bot|>", "\n", " ",
                          "{{", "}}", "{%", "%}", "@EOS@", "'", '"', "\\", "{#"])
EXAMPLES = st.lists(st.one_of(PIECES, st.text(max_size=4)), max_size=16).map("".join)
WELL_FORMED = st.tuples(st.text(max_size=4), st.text(max_size=4), st.text(max_size=4), st.text(max_size=4)).map(
    lambda p: f"{p[0]}{{INPUT}}{p[1]}{{OUTPUT}}{p[2]}{p[3]}{{INPUT}}{p[1]}{{OUTPUT}}{p[2]}")


@FUZZ
@given(example=st.one_of(EXAMPLES, WELL_FORMED), system=st.sampled_from(["", "Be brief.", "{{ x }}"]))
def test_custom_template_builder(example, system):
    from tunefix.templates.custom import from_example

    t = _only_clean_errors(from_example, example, default_system=system)
    if t is not None:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        out = _only_clean_errors(t.render, msgs, eos_token="</s>")
        assert out is None or "hi" in out


ATOMS = st.sampled_from(["messages", "messages[0]", "messages[0].content", "messages[-1]['role']", "9", "0",
                         "'a'", "[]", "{}", "none", "x", "bos_token", "loop", "range(3)", "namespace(a=1)",
                         "raise_exception('no')", "cycler", "''.__class__"])
OPS = st.sampled_from([" + ", " - ", " * ", " / ", " // ", " % ", " ** ", " ~ ", " and ", " in "])
FILTERS = st.sampled_from(["", "|length", "|int", "|first", "|tojson", "|trim", "[0]", ".content", ".x", "|join"])
EXPR = st.lists(st.tuples(ATOMS, FILTERS), min_size=1, max_size=3).flatmap(
    lambda parts: st.lists(OPS, min_size=len(parts) - 1, max_size=len(parts) - 1).map(
        lambda ops: "".join(a + f + (ops[i] if i < len(ops) else "") for i, (a, f) in enumerate(parts))))
STATEMENT = st.one_of(
    EXPR.map(lambda e: "{{ " + e + " }}"),
    EXPR.map(lambda e: "{% for m in " + e + " %}{{ m }}{% endfor %}"),
    EXPR.map(lambda e: "{% if " + e + " %}y{% endif %}"),
    EXPR.map(lambda e: "{% set v = " + e + " %}{{ v }}"),
    st.sampled_from(["{{", "}}", "{%", "%}", "{#", "{% endfor %}", "{% if %}", "text"]),
)


@FUZZ
@given(source=st.lists(STATEMENT, min_size=1, max_size=4).map("".join))
def test_jinja_render_of_arbitrary_templates(source):
    from tunefix.templates.render import render_jinja

    _only_clean_errors(render_jinja, source, [{"role": "user", "content": "hi"}], bos_token="<s>",
                       eos_token="</s>")


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    import shutil

    shutil.rmtree(_DIR, ignore_errors=True)
