"""DPO on the tiny random llama: stored reference log-probs, learning, resume, NaN stop, bad input."""

from __future__ import annotations

from dataclasses import replace

import json
import math

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from mlx_cai import adapters, models
from mlx_cai.losses import sequence_logps
from mlx_cai.records import RecordError
from mlx_cai.stages import dpo
from mlx_cai.stages.sft import SFTConfig
from mlx_cai.train import checkpoint, data
from mlx_cai.train.config import NonFiniteLoss, TrainingError
from mlx_cai.train.logps import answer_logps

PAIRS = [("say cat", "cat cat", "no cat today"), ("say dog", "dog dog", "dogs? never"),
         ("say sun", "sun sun", "sunny no"), ("say tree", "tree tree", "trees are dull")]


def write_pairs(path, rows=None):
    rows = rows if rows is not None else [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_adapter(tiny_gguf, tmp_path_factory):
    """An SFT-shaped adapter with non-zero weights (LoRA on both blocks), made without training."""
    model, _ = models.load(str(tiny_gguf))
    cfg = SFTConfig(model=str(tiny_gguf), data="-", output="-", lora_layers=2)
    mx.random.seed(1)
    adapters.add_lora(model, cfg)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, model.trainable_parameters()))
    folder = tmp_path_factory.mktemp("sft") / "adapter"
    adapters.save_adapter(model, folder, adapters.adapter_config(cfg, model, "sft/1"))
    return folder


def config(tiny_gguf, tmp_path, adapter, **kw) -> dpo.DPOConfig:
    base = dict(model=str(tiny_gguf), adapter=str(adapter), pairs=str(write_pairs(tmp_path / "pairs.jsonl")),
                output=str(tmp_path / "out"), iters=6, batch_size=2, learning_rate=2e-3, warmup_steps=0,
                steps_per_eval=100, steps_per_save=3)
    base.update(kw)
    return dpo.DPOConfig(**base)


def metric_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


@pytest.mark.parametrize("streams", ["1", "2"])  # the reference pass in one stream, or slices on two
def test_stored_reference_logps_equal_a_recomputation_and_policy_starts_there(tiny_gguf, tmp_path, sft_adapter,
                                                                             streams, monkeypatch):
    monkeypatch.setenv("MLX_CAI_TRAIN_STREAMS", streams)
    out = dpo.run(config(tiny_gguf, tmp_path, sft_adapter, iters=1))
    stored = {r["id"]: r for r in map(json.loads, (out / "ref_logps.jsonl").read_text().splitlines())}
    assert len(stored) == 4
    model, tok = models.load(str(tiny_gguf), adapter=sft_adapter)  # the SFT model, fresh, one pair at a time
    pairs, _ = dpo.tokenize(tok, dpo.read_pairs(tmp_path / "pairs.jsonl")[0], config(tiny_gguf, tmp_path,
                                                                                         sft_adapter))
    for p in pairs:
        logps, n = answer_logps(model, *dpo.pair_batch([p]))
        assert logps[0].item() == pytest.approx(stored[p.id]["chosen"], abs=1e-4)
        assert logps[1].item() == pytest.approx(stored[p.id]["rejected"], abs=1e-4)
        assert int(n[0].item()) == stored[p.id]["chosen_tokens"] == len(p.chosen)
    first = metric_rows(out)[0]  # the policy is the SFT model at step 1: zero rewards, loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/margins"]) < 1e-4
    assert set(first) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                          "logps/chosen", "logps/rejected", "grad_norm"}
    adapter = json.loads((out / adapters.ADAPTER_CONFIG).read_text())
    assert adapter["stage"] == "dpo/1" and adapter["reference"] == str(sft_adapter)
    sft_config = json.loads((sft_adapter / adapters.ADAPTER_CONFIG).read_text())
    assert adapter["lora_parameters"] == sft_config["lora_parameters"]


def test_chosen_and_rejected_share_one_forward_pass(tiny):
    model, tok = tiny
    pairs = [dpo.TokenPair("a", tok.encode("hello"), tok.encode("yes!"), tok.encode("no, not at all")),
             dpo.TokenPair("b", tok.encode("a longer prompt here"), tok.encode("ok"), tok.encode("nope"))]
    tokens, lengths, positions, rows = dpo.pair_batch(pairs)
    prompts = [len(p.prompt) for p in pairs]
    assert tokens.shape[0] == 4 and lengths[:, 0].tolist() == prompts + prompts
    assert tokens[2, : lengths[2, 1].item()].tolist() == pairs[0].prompt + pairs[0].rejected
    logps, n = answer_logps(model, tokens, lengths, positions, rows)  # answer positions only
    full, n_full = sequence_logps(model(tokens[:, :-1]), tokens[:, 1:],
                                  data.completion_mask(lengths, tokens.shape[1] - 1))
    answers = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    assert mx.allclose(logps, full, atol=1e-4).item() and n.tolist() == n_full.tolist() == answers


def test_dpo_learns_the_preferences(tiny_gguf, tmp_path, sft_adapter):
    out = dpo.run(config(tiny_gguf, tmp_path, sft_adapter, iters=8, batch_size=4, steps_per_save=8))
    rows = metric_rows(out)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["rewards/margins"] > 0.5
    before = dict(mx.load(str(sft_adapter / adapters.ADAPTER_FILE)))
    after = dict(mx.load(str(out / adapters.ADAPTER_FILE)))
    assert before.keys() == after.keys()  # the same LoRA parameters, trained further
    assert any(not mx.allclose(before[k], after[k]).item() for k in before)
    # The DPO adapter alone is the whole policy: it loads like any adapter.
    policy, tok = models.load(str(tiny_gguf), adapter=out)
    assert mx.isfinite(policy(mx.array([tok.encode("say cat")]))).all().item()


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_gguf, tmp_path, sft_adapter):
    straight = dpo.run(config(tiny_gguf, tmp_path / "a", sft_adapter))

    def kill(event):
        row = event.metrics or {}
        if row.get("step") == 4 and "loss" in row:
            raise KeyboardInterrupt

    cfg = config(tiny_gguf, tmp_path / "b", sft_adapter)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg, progress=kill)
    resumed = dpo.run(replace(cfg, resume=True))
    a, b = dict(mx.load(str(straight / adapters.ADAPTER_FILE))), dict(mx.load(str(resumed / adapters.ADAPTER_FILE)))
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k
    assert [r["step"] for r in metric_rows(resumed)] == [1, 2, 3, 4, 5, 6]
    assert len((resumed / "ref_logps.jsonl").read_text().splitlines()) == 4  # reused, not recomputed


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_gguf, tmp_path, sft_adapter):
    cfg = config(tiny_gguf, tmp_path, sft_adapter, learning_rate=1e30, max_grad_norm=0, steps_per_save=1, iters=6)
    with pytest.raises(NonFiniteLoss, match=r"(nan|inf).*Last good checkpoint: .*step-000000\d.*--resume") as e:
        dpo.run(cfg)
    out = tmp_path / "out"
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and str(ckpt) in str(e.value)
    assert all(mx.isfinite(v).all().item() for v in mx.load(str(ckpt / adapters.ADAPTER_FILE)).values())
    assert not (out / adapters.ADAPTER_FILE).exists()  # no final adapter from a broken run


def test_pairs_input_policy(tiny_gguf, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a2", "chosen": "  ", "rejected": "c"},
            {"prompt": "a3", "chosen": "same", "rejected": "same"},
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": [{"role": "user", "content": "m"}], "chosen": [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "assistant", "content": "y"}]}]
    pairs, counts = dpo.read_pairs(write_pairs(tmp_path / "p.jsonl", rows))
    assert [p.chosen for p in pairs] == ["b", "x"]
    assert counts == {"read": 5, "skipped_empty_response": 1, "skipped_identical": 1, "skipped_duplicate": 1}
    with pytest.raises(RecordError, match=r"m.jsonl:2: missing field\(s\) rejected"):
        dpo.read_pairs(write_pairs(tmp_path / "m.jsonl", [rows[0], {"prompt": "a", "chosen": "b"}]))
    for text in ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "[INST] hi [/INST]",
                 "\n\nHuman: hi\n\nAssistant:"]:
        with pytest.raises(RecordError, match="t.jsonl:1: the prompt already holds chat-template markup"):
            dpo.read_pairs(write_pairs(tmp_path / "t.jsonl", [{"prompt": text, "chosen": "b", "rejected": "c"}]))
    with pytest.raises(TrainingError, match="no usable pairs"):
        dpo.read_pairs(write_pairs(tmp_path / "e.jsonl", [rows[1]]))


def test_length_policy_is_counted_or_refused(tiny, tmp_path):
    _, tok = tiny
    pairs = [dpo.Pair("long", [{"role": "user", "content": "p " * 100}], "c " * 100, "r"),
             dpo.Pair("short", [{"role": "user", "content": "hi"}], "yes", "no")]
    cfg = dict(pairs="x", output="o", max_seq_length=80, max_prompt_length=40)
    kept, counts = dpo.tokenize(tok, pairs, dpo.DPOConfig(**cfg))
    assert counts == {"truncated": 1, "skipped_too_long": 0}
    assert len(kept[0].prompt) == 40 and len(kept[0].prompt) + len(kept[0].chosen) == 80
    kept, counts = dpo.tokenize(tok, pairs, dpo.DPOConfig(**cfg, truncation="skip"))
    assert [p.id for p in kept] == ["short"] and counts["skipped_too_long"] == 1
    with pytest.raises(TrainingError, match="pair long has .* tokens, over max_seq_length 80"):
        dpo.tokenize(tok, pairs, dpo.DPOConfig(**cfg, truncation="error"))


def test_adapter_from_another_base_model_is_refused(tiny_gguf, tmp_path, sft_adapter):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / adapters.ADAPTER_FILE).write_bytes((sft_adapter / adapters.ADAPTER_FILE).read_bytes())
    cfg = json.loads((sft_adapter / adapters.ADAPTER_CONFIG).read_text())
    cfg["base_model"]["hidden_size"] = 576
    (foreign / adapters.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match="trained on another base model.*hidden_size 576"):
        dpo.run(config(tiny_gguf, tmp_path, foreign))
    with pytest.raises(TrainingError, match="trained on another base model.*hidden_size 576"):
        models.load(str(tiny_gguf), adapter=foreign)  # the one adapter loader: the same check for inference
    cfg.pop("base_model")  # an adapter from elsewhere (mlx_lm.lora) without our fingerprint: shapes decide
    cfg["lora_parameters"]["rank"] = 4
    (foreign / adapters.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match="does not fit this model.*shape"):
        dpo.run(config(tiny_gguf, tmp_path, foreign, output=str(tmp_path / "o2")))
    with pytest.raises(TrainingError, match="not an adapter folder"):
        dpo.run(config(tiny_gguf, tmp_path, tmp_path, output=str(tmp_path / "o3")))


def test_two_cpu_streams_match_one(tiny_gguf, tmp_path, sft_adapter, monkeypatch):
    """DPO batches split over two CPU streams (pairs strided over the slices) give the one-stream adapter."""
    outs = {}
    for n in ("1", "2"):
        monkeypatch.setenv("MLX_CAI_TRAIN_STREAMS", n)
        outs[n] = dpo.run(config(tiny_gguf, tmp_path / n, sft_adapter, iters=3, batch_size=4))
    a, b = (dict(mx.load(str(outs[n] / adapters.ADAPTER_FILE))) for n in ("1", "2"))
    for k in a:  # Adam: float noise in near-zero gradient entries moves them by up to lr per step
        assert mx.allclose(a[k], b[k], atol=1e-4).item(), k
    rows = metric_rows(outs["1"]), metric_rows(outs["2"])
    assert len(rows[0]) == len(rows[1]) == 3
    for ra, rb in zip(*rows):
        assert ra["examples"] == rb["examples"] == 4
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), k


def test_batch_mix_groups_puts_each_kind_of_pair_in_every_batch(tiny_gguf, tmp_path, sft_adapter, monkeypatch):
    """batch_mix: groups reads each pair's source.kind and cuts batches that mix the kinds in proportion; by length
    (the default) the short harmful-style pairs and the long boundary-style pairs fall into batches of their own."""
    # interleave (pure): members keep their order, groups spread in proportion (3 b's among 6 a's)
    assert data.interleave(list(range(9)), ["a"] * 6 + ["b"] * 3) == [0, 6, 1, 2, 7, 3, 4, 8, 5]
    kinds = ["boundary"] * 4 + [""] * 4
    lengths = [40, 41, 42, 43, 10, 11, 12, 13]  # boundary pairs are the long ones, as in the demo
    by_length = data.BatchOrder(lengths, 2, 0)
    mixed = data.BatchOrder(lengths, 2, 0, kinds)
    assert all(len({kinds[i] for i in b}) == 1 for b in by_length.batches)
    assert all(len({kinds[i] for i in b}) == 2 for b in mixed.batches)
    assert sorted(i for b in mixed.batches for i in b) == list(range(8))
    assert data.BatchOrder(lengths, 2, 0, [""] * 8).batches == by_length.batches  # one group: as by length

    rows = [{"id": f"p{i}", "prompt": p, "chosen": c, "rejected": r, **({"source": {"kind": "boundary"}} if i % 2
                                                                        else {})} for i, (p, c, r) in enumerate(PAIRS)]
    pairs, _ = dpo.read_pairs(write_pairs(tmp_path / "k.jsonl", rows))
    assert [p.group for p in pairs] == ["", "boundary", "", "boundary"]
    seen = []
    real = data.BatchOrder
    monkeypatch.setattr(data, "BatchOrder", lambda *a: seen.append(a) or real(*a))  # what training batches by
    out = dpo.run(config(tiny_gguf, tmp_path, sft_adapter, pairs=str(tmp_path / "k.jsonl"), batch_mix="groups",
                         iters=2, steps_per_save=2))
    assert all(math.isfinite(r["loss"]) for r in metric_rows(out))
    assert sorted(seen[0][3]) == ["", "", "boundary", "boundary"]
    assert all(len({seen[0][3][i] for i in b}) == 2 for b in real(*seen[0]).batches)
    with pytest.raises(TrainingError, match="batch_mix"):
        config(tiny_gguf, tmp_path, sft_adapter, batch_mix="random")
