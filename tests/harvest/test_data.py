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
