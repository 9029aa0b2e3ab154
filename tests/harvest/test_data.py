import json

import pytest

from fast_sae.harvest.data import (
    EMBEDDED_CHAT,
    EMBEDDED_TEXT,
    DataError,
    DataSource,
    iter_conversations,
    iter_texts,
    row_to_messages,
)


@pytest.mark.slow
def test_embedded_data_is_real_and_multi_turn():
    convs = list(iter_conversations(DataSource(EMBEDDED_CHAT)))
    assert len(convs) > 1000
    assert max(len(c) for c in convs) > 4
    assert [m["role"] for m in convs[0][:2]] == ["user", "assistant"]
    texts = list(iter_texts(DataSource(EMBEDDED_TEXT, limit=5)))
    assert len(texts) == 5 and all(len(t) > 100 for t in texts)


@pytest.mark.parametrize("row,expected", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     [("user", "a"), ("assistant", "b")]),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
     [("user", "a"), ("assistant", "b")]),
    ({"instruction": "do", "input": "this", "output": "done"}, [("user", "do\n\nthis"), ("assistant", "done")]),
])
def test_conversation_formats(row, expected):
    assert [(m["role"], m["content"]) for m in row_to_messages(row, "r")] == expected


@pytest.mark.slow
def test_local_files_through_datasets(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(3)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    convs = list(iter_conversations(DataSource(str(f))))
    assert [c[0]["content"] for c in convs] == ["q0", "q1", "q2"]
    t = tmp_path / "t.jsonl"
    t.write_text("\n".join(json.dumps({"body": "x"}) for _ in range(2)))
    with pytest.raises(DataError, match="field 'text' must be a string"):
        list(iter_texts(DataSource(str(t))))
    assert list(iter_texts(DataSource(str(t)), text_field="body")) == ["x", "x"]


def test_bad_sharegpt_speaker():
    with pytest.raises(DataError, match=r"conversations\[0\]"):
        row_to_messages({"conversations": [{"from": "robot", "value": "x"}]}, "r")


@pytest.mark.slow
def test_a_plain_string_chatterbot_entry_is_one_turn_not_one_per_character():
    convs = list(iter_conversations(DataSource(EMBEDDED_CHAT)))
    bingo = [c for c in convs if c[0]["content"].startswith("In a game of bingo")]
    assert len(bingo) == 1 and len(bingo[0]) == 1
    assert bingo[0][0]["content"].endswith("\"two little ducks\"? - '22'")
    assert all(len(m["content"]) > 1 or m["content"].isalnum() for c in convs for m in c)


def _chat_row(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})


def test_a_stray_file_in_a_data_folder_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(_chat_row(0))
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")  # hidden files are not data and are skipped
    assert len(list(iter_conversations(DataSource(str(tmp_path))))) == 1
    (tmp_path / "notes.txt").write_text("remember to clean this folder")
    with pytest.raises(DataError, match=r"notes\.txt: not a data file \(expected \.json, \.jsonl"):
        list(iter_conversations(DataSource(str(tmp_path))))
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "b.csv").write_text("x\n1\n")
    with pytest.raises(DataError, match=r"mixes file kinds \(a\.jsonl and b\.csv\)"):
        list(iter_conversations(DataSource(str(tmp_path))))


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(_chat_row(0) + "\n" + _chat_row(1) + "\n")
    (tmp_path / "b.jsonl").write_text(_chat_row(2) + "\n\n" + _chat_row(3)[:-9] + "\n" + _chat_row(4) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl line 3: not valid JSON"):
        list(iter_conversations(DataSource(str(tmp_path))))
    (tmp_path / "b.jsonl").write_text(_chat_row(2) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"b\.jsonl line 2: expected a JSON object per line, got list"):
        list(iter_conversations(DataSource(str(tmp_path / "b.jsonl"))))
