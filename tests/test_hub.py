"""mlx_cai.hub: SFT folders and pairs files become a datasets.DatasetDict (offline; nothing is uploaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_cai import hub, records


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_sft_folder_keeps_mlx_lm_split_names(tmp_path: Path) -> None:
    records.write_jsonl_atomic(tmp_path / "train.jsonl", [chat("q1", "a1"), chat("q2", "a2")])
    records.write_jsonl_atomic(tmp_path / "valid.jsonl", [chat("q3", "a3")])
    records.write_jsonl_atomic(tmp_path / "test.jsonl", [])  # empty: left out
    (tmp_path / "summary.json").write_text("{}")  # other files in the folder are ignored
    dd = hub.to_dataset_dict(tmp_path)
    assert sorted(dd) == ["train", "valid"]
    assert dd["train"].num_rows == 2 and dd["valid"][0] == chat("q3", "a3")
    assert dd["train"].column_names == ["messages"]


def test_pairs_file(tmp_path: Path) -> None:
    rows = [{"id": f"p{i}", "prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "extra": {"x": i}}
            for i in range(3)]
    dd = hub.to_dataset_dict(records.write_jsonl_atomic(tmp_path / "pairs.jsonl", rows))
    assert list(dd) == ["train"]
    assert dd["train"].column_names == ["prompt", "chosen", "rejected", "id"]
    assert dd["train"][1] == {"prompt": "q1", "chosen": "good 1", "rejected": "bad 1", "id": "p1"}


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(hub.HubError, match="no non-empty train.jsonl"):
        hub.to_dataset_dict(tmp_path)
    odd = records.write_jsonl_atomic(tmp_path / "odd.jsonl", [{"question": "x"}])
    with pytest.raises(hub.HubError, match="prompt/chosen/rejected"):
        hub.to_dataset_dict(odd)
    broken = records.write_jsonl_atomic(tmp_path / "b" / "train.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(hub.HubError, match="record 1: `messages` must be"):
        hub.to_dataset_dict(broken.parent)
    partial = records.write_jsonl_atomic(tmp_path / "partial.jsonl",
                                         [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}])
    with pytest.raises(hub.HubError, match="record 2: needs prompt, chosen and rejected"):
        hub.to_dataset_dict(partial)


def test_push_needs_token_and_repo_id(tmp_path: Path, monkeypatch) -> None:
    records.write_jsonl_atomic(tmp_path / "train.jsonl", [chat("q", "a")])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(hub.HubError, match=r"\$HF_TOKEN"):
        hub.push(tmp_path, "me/cai-sft")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(hub.HubError, match="not a dataset repo id"):
        hub.push(tmp_path, "no-owner")
