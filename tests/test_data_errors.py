"""Bad data is named where it is: every row error gives the file and the 1-based line (JSON Lines) or row (other
formats), through shuffles and splits; data left with nothing to train on is refused with the reasons counted."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers import TOKENIZER_DIR
from test_data import PAIRS, TEMPLATE, make_dm, write_jsonl
from transformers import AutoTokenizer

from lightning_mtp.data.chat import RecordEncoder, RecordFormat, prompt_of, require_usable
from lightning_mtp.data.files import ORIGIN_COLUMN, load_source


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---------------------------------------------------------------------------------------------- unreadable lines
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(PAIRS[0]), "", '{"prompt": "a", "response": "b"'])
    with pytest.raises(ValueError, match=r"^train data .*train\.jsonl line 3: not valid JSON \(Expecting ',' "
                                         r"delimiter at column 32\)$"):
        load_source(path, cache_dir=str(tmp_path / "cache"), what="train data")


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(PAIRS[0]), "[1, 2]"])
    with pytest.raises(ValueError, match=r"train\.jsonl line 2: not a JSON object \(\{\.\.\.\}\) but an array: \[1, 2\]"):
        load_source(path, cache_dir=str(tmp_path / "cache"), what="train data")


# ---------------------------------------------------------------------------------------------- row errors
def test_a_record_without_its_field_is_named_by_file_and_line_through_a_shuffled_split(tmp_path):
    (tmp_path / "dir").mkdir()
    records = [*PAIRS[:6], {"prompt": "Question: 1?"}, *PAIRS[6:]]
    write_jsonl(tmp_path / "dir" / "a.jsonl", records[:2])
    write_lines(tmp_path / "dir" / "b.jsonl", [json.dumps(r) for r in records[2:4]] + [""]  # a blank line counts
                + [json.dumps(r) for r in records[4:]])
    with pytest.raises(ValueError, match=r"^\S*dir/b\.jsonl line 6 has no 'response' \(a string\), got None$"):
        make_dm(tmp_path, str(tmp_path / "dir"), val_size=3)  # the hold-out shuffles the records first


def test_a_bad_chat_record_is_named_by_line_and_field(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]},
                                              {"messages": [{"speaker": "user", "text": "hi"}]}])
    with pytest.raises(ValueError, match=r"c\.jsonl line 2, field 'messages': message 0 needs a string 'role'"):
        make_dm(tmp_path, data, chat_template=TEMPLATE)


def test_parquet_and_saved_datasets_name_the_1_based_row(tmp_path):
    records = [*PAIRS[:3], {"prompt": "Question: 1?", "response": None}, *PAIRS[3:]]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match=r"d\.parquet row 4 has no 'response' \(a string\), got None"):
        make_dm(tmp_path, str(tmp_path / "d.parquet"), val_size=2)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"^row 4 of train data '.*saved' has no 'response'"):
        make_dm(tmp_path, str(tmp_path / "saved"), val_size=2)


def test_records_of_no_file_are_counted_from_1():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    fmt = RecordFormat(fields="prompt_response")
    encoder = RecordEncoder(tok, fmt, None, 64, "right", "train data (list)")
    with pytest.raises(ValueError, match=r"^row 2 of train data \(list\) has no 'response'"):
        encoder({"prompt": ["a", "b"], "response": ["c", None]}, [0, 1])


def test_self_distillation_prompts_are_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Question: 1?"}, {"prompt": ""}])
    records = load_source(path, cache_dir=str(tmp_path / "cache"))
    assert ORIGIN_COLUMN in records.column_names
    fmt = RecordFormat().resolve(records.column_names, "distill data", prompts_only=True)
    assert fmt.fields == "prompt_response"
    with pytest.raises(ValueError, match=r"^\S*p\.jsonl line 2 has no 'prompt'"):
        prompt_of(records[1], fmt, None, None, "record 1 of distill data")


def test_the_origin_column_is_not_listed_as_a_field_of_the_data(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "x"}])
    with pytest.raises(ValueError, match=r"no known field among its fields \['question'\];"):
        make_dm(tmp_path, path)


# ---------------------------------------------------------------------------------------------- nothing to train on
def test_empty_responses_are_dropped_and_counted(tmp_path):
    records = [*PAIRS[:4], {"prompt": "Question: 1?", "response": ""}, {"prompt": "Question: 2?", "response": "  "}]
    dm = make_dm(tmp_path, write_jsonl(tmp_path / "d.jsonl", records))
    assert dm.stats["train"]["dropped: empty response"] == 2 and dm.stats["train"]["records"] == 4


def test_data_whose_every_response_is_empty_is_refused_with_the_reason(tmp_path):
    records = [{"prompt": p["prompt"], "response": ""} for p in PAIRS[:5]]
    with pytest.raises(ValueError, match=r"no record left to train on \(\{'dropped: empty response': 5\}\)"):
        make_dm(tmp_path, write_jsonl(tmp_path / "d.jsonl", records))
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] * 3
    with pytest.raises(ValueError, match=r"no record left to train on \(\{'dropped: empty response': 3\}\)"):
        make_dm(tmp_path, write_jsonl(tmp_path / "c.jsonl", chats), chat_template=TEMPLATE)
    with pytest.raises(ValueError, match=r"no record left to train on \(\{'dropped: empty text': 2\}\)"):
        make_dm(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": " "}]))


def test_require_usable_names_each_reason_and_its_fix():
    require_usable("train data 'd.jsonl'", {"kept": 1, "dropped: too long": 4})  # something is left: fine
    with pytest.raises(ValueError, match=r"^train data 'd\.jsonl': no record left to train on \(\{'dropped: too long': "
                                         r"2, 'dropped: empty response': 3\}\); dropped: too long: raise max_length.*"
                                         r"; dropped: empty response: fill the response field"):
        require_usable("train data 'd.jsonl'", {"dropped: too long": 2, "dropped: empty response": 3})
