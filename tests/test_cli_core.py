"""`mlx-cai generate` / `info` end to end through the CLI, on the tiny random llama and real files."""

import json

from typer.testing import CliRunner

from mlx_cai import models
from mlx_cai.cli import app

runner = CliRunner()


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_generate_writes_records_and_resumes_without_duplicates(tiny_gguf, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nhow are you\nwrite a poem\nhello\nwhat is 2+2\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(prompts), "-o", str(out), "--model", str(tiny_gguf), "--max-tokens", "6",
            "--batch-size", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    first = lines(out)
    assert len(first) == 5 and len({x["id"] for x in first}) == 5  # the repeated "hello" gets its own id
    assert set(first[0]) >= {"id", "prompt", "response", "finish_reason", "prompt_tokens", "completion_tokens"}
    # Simulate a kill: two records kept, the third torn mid-write.
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:20])
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    again = lines(out)
    assert sorted(x["id"] for x in again) == sorted(x["id"] for x in first)
    assert {x["id"]: x["response"] for x in again} == {x["id"]: x["response"] for x in first}
    r = runner.invoke(app, args)
    assert "already done" in r.output and len(lines(out)) == 5


def test_generate_jsonl_messages_and_ids(tiny_gguf, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q1", "prompt": "hi"}) + "\n" +
                       json.dumps({"id": "q2", "messages": [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "yo"}]}) + "\n")
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["generate", str(prompts), "-o", str(out), "-m", str(tiny_gguf), "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    recs = {x["id"]: x for x in lines(out)}
    assert set(recs) == {"q1", "q2"} and recs["q2"]["prompt"] == "yo"


def test_bad_inputs_are_one_line_errors(tiny_gguf, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "keep"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "x"}\n')
    cases = [
        (["generate", str(bad), "-o", str(out), "-m", str(tiny_gguf)], "bad.jsonl:2: malformed JSON"),
        (["generate", str(empty), "-o", str(out), "-m", str(tiny_gguf)], "empty.txt: no prompts"),
        (["generate", str(nofield), "-o", str(out), "-m", str(tiny_gguf)], "nofield.jsonl:1: needs a non-empty"),
        (["generate", str(empty.with_name("nope.txt")), "-o", str(out)], "file not found"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output
        assert msg in r.output and "Traceback" not in r.output
    good = tmp_path / "g.txt"
    good.write_text("hi\n")
    r = runner.invoke(app, ["generate", str(good), "-o", str(out), "-m", "no-such-model"])
    assert r.exit_code == 1 and "unknown model spec 'no-such-model'" in r.output and "Hugging Face" in r.output
    assert out.read_text() == '{"id": "keep"}\n'  # nothing already written is lost


def test_dequantize_choice_is_visible_and_overridable(monkeypatch):
    monkeypatch.delenv("MLX_CAI_DEQUANTIZE", raising=False)
    assert models.should_dequantize() is True  # this machine's device is the CPU
    assert models.should_dequantize(False) is False
    monkeypatch.setenv("MLX_CAI_DEQUANTIZE", "0")
    assert models.should_dequantize() is False


def test_info_reports_blas_and_device():
    r = runner.invoke(app, ["info"])
    assert r.exit_code == 0, r.output
    assert "OpenBLAS" in r.output and "GFLOP/s" in r.output and "cpu" in r.output
    assert "cpu kernels" in r.output


def test_local_mlx_folder_and_offline_hub_spec(tiny_gguf, monkeypatch):
    folder = models.resolve(str(tiny_gguf))
    model, tok = models.load(str(folder))
    assert model.mlx_cai_info.path == str(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        models.load("nobody/no-such-model-xyz")
    except models.ModelError as e:
        assert "cannot fetch 'nobody/no-such-model-xyz'" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("expected ModelError")


def test_chat_streams_multi_turn(tiny_gguf):
    r = runner.invoke(app, ["chat", "-m", str(tiny_gguf), "--max-tokens", "4", "--temperature", "0"],
                      input="hello\nand again\n\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("bot>") == 2


def test_keep_quantized_flag(tmp_path, monkeypatch):
    from tinymodels import Q, write_tiny_gguf

    monkeypatch.setenv("MLX_CAI_HOME", str(tmp_path / "home"))
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, {"ffn_": Q.Q4_0})
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    for flag in ("--keep-quantized", "--dequantize"):
        out = tmp_path / f"o{flag}.jsonl"
        r = runner.invoke(app, ["generate", str(prompts), "-o", str(out), "-m", str(path), "--max-tokens", "3", flag])
        assert r.exit_code == 0, r.output
        [rec] = lines(out)
        assert rec["dequantized"] is (flag == "--dequantize")


def test_the_command_runs_as_a_module_too():
    import subprocess
    import sys

    for module in ("mlx_cai", "mlx_cai.cli"):  # `python -m mlx_cai.cli` once failed on a circular import
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "revise" in r.stdout and "Usage" in r.stdout, r.stderr[-500:]
