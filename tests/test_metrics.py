"""Collapse metrics and the keyword refusal judge against hand-computed values."""

import gzip

import pytest

from mlx_cai.metrics import (
    collapse_summary,
    compression_ratio,
    distinct_n,
    emoji_count,
    emoji_density,
    frequent_phrases,
    max_emoji_run,
    non_termination_rate,
    phrase_repeat_rate,
    sentence_repetition,
    seq_rep_n,
    words,
)
from mlx_cai.refusal import REFUSAL_MARKERS, is_refusal, matched_markers

approx = pytest.approx


# ---------------------------------------------------------------- words


def test_words_lowercases_and_splits_punctuation():
    assert words("I'm fine, THANKS!") == ["i", "'", "m", "fine", ",", "thanks", "!"]


def test_words_folds_curly_apostrophe_and_splits_emojis():
    assert words("I’M ok 😀😀") == ["i", "'", "m", "ok", "😀", "😀"]


def test_words_empty():
    assert words("") == []
    assert words("  \n ") == []


# ---------------------------------------------------------------- seq_rep_n


def test_seq_rep_4_hand_computed():
    # 8 tokens -> 5 4-grams: abcd bcda cdab dabc abcd; 4 unique -> 1 - 4/5
    assert seq_rep_n("a b c d a b c d", 4) == approx(0.2)


def test_seq_rep_2_all_same():
    # 4 tokens -> 3 bigrams, all ("the","the"); 1 unique -> 1 - 1/3
    assert seq_rep_n("The the THE the", 2) == approx(2 / 3)


def test_seq_rep_no_repetition():
    assert seq_rep_n("one two three four five", 4) == 0.0


def test_seq_rep_edge_cases():
    assert seq_rep_n("", 4) == 0.0
    assert seq_rep_n("hello", 4) == 0.0  # 1 token, no 4-grams
    assert seq_rep_n("hello", 1) == 0.0  # 1 unigram, 1 unique


# ---------------------------------------------------------------- distinct_n


def test_distinct_1_pooled():
    # tokens a b a | b c -> 5 total, {a, b, c} = 3 unique -> 3/5
    assert distinct_n(["a b a", "b c"], 1) == approx(0.6)


def test_distinct_2_does_not_cross_texts():
    # bigrams (a,b) (b,a) | (b,c) -> 3 total, 3 unique; "a b c" join would add (a,b)->(b,c) spanning
    assert distinct_n(["a b a", "b c"], 2) == approx(1.0)
    # (a,b) | (a,b) -> 2 total, 1 unique
    assert distinct_n(["a b", "A B"], 2) == approx(0.5)


def test_distinct_edge_cases():
    assert distinct_n([], 1) == 0.0
    assert distinct_n([""], 1) == 0.0
    assert distinct_n(["word"], 2) == 0.0
    assert distinct_n(["word"], 1) == 1.0


# ---------------------------------------------------------------- sentence repetition


def test_sentence_repetition_hand_computed():
    # sentences: "hi there", "hi there", "bye", "hi there" (blank line dropped)
    # -> 4 sentences, 2 unique -> 1 - 2/4
    assert sentence_repetition("Hi there. Hi  there! Bye.\n\nhi there?") == approx(0.5)


def test_sentence_repetition_edge_cases():
    assert sentence_repetition("") == 0.0
    assert sentence_repetition("...!?\n") == 0.0
    assert sentence_repetition("One sentence") == 0.0


# ---------------------------------------------------------------- compression ratio


def test_compression_ratio_hand_computed():
    # gzip = 10-byte header + 8-byte trailer + deflate body (2 bytes empty, 3 bytes for "a")
    assert compression_ratio("a") == approx(1 / 21)
    assert compression_ratio("ab") == approx(2 / 22)


def test_compression_ratio_matches_definition_and_orders_repetition():
    rep = "I love you. " * 50
    data = rep.encode("utf-8")
    assert compression_ratio(rep) == approx(len(data) / len(gzip.compress(data, mtime=0)))
    varied = "The quick brown fox jumps over the lazy dog while seven wizards box quietly."
    assert compression_ratio(rep) > 10 > compression_ratio(varied)


def test_compression_ratio_empty_and_utf8():
    assert compression_ratio("") == 0.0
    # "é" is 2 UTF-8 bytes (C3 A9), deflate body 4 bytes -> 2 / (18 + 4); chars would give 1/22
    assert compression_ratio("é") == approx(2 / 22)


# ---------------------------------------------------------------- emoji


def test_emoji_count_and_density():
    # 2 emojis out of 4 chars
    assert emoji_count("ab😀👍") == 2
    assert emoji_density("ab😀👍") == approx(0.5)


def test_emoji_blocks_and_variation_selector():
    # U+2600 sun (misc symbols) + U+FE0F (not counted): 1 emoji / 2 chars
    assert emoji_count("☀\ufe0f") == 1
    assert emoji_density("☀\ufe0f") == approx(0.5)
    # U+2764 heart (dingbats), U+1F004 mahjong tile, U+1F1FA U+1F1F8 flag (2 indicators),
    # U+1FAE0 (symbols & pictographs ext-A)
    assert emoji_count("\u2764\U0001F004\U0001F1FA\U0001F1F8\U0001FAE0") == 5
    assert emoji_count("plain text, 123 ©") == 0


def test_emoji_edge_cases():
    assert emoji_count("") == 0
    assert emoji_density("") == 0.0
    assert max_emoji_run("") == 0
    assert max_emoji_run("no emoji here") == 0


def test_max_emoji_run_whitespace_allowed_text_breaks():
    assert max_emoji_run("ok 🎉 🎉🎉! 😀😀") == 3  # "🎉 🎉🎉" then "!" breaks
    assert max_emoji_run("🎉a🎉") == 1
    assert max_emoji_run("🎉\n\t🎉") == 2


def test_max_emoji_run_zwj_sequence():
    # family = man ZWJ woman ZWJ girl: 3 pictographs, joiners don't break the run
    assert max_emoji_run("👨\u200d👩\u200d👧") == 3
    assert max_emoji_run("❤️❤️❤️") == 3  # each heart followed by FE0F


# ---------------------------------------------------------------- termination / phrases


def test_non_termination_rate():
    assert non_termination_rate(["stop", "length", "length", "stop"]) == approx(0.5)
    assert non_termination_rate([]) == 0.0
    assert non_termination_rate(["stop"]) == 0.0


def test_phrase_repeat_rate_case_and_whitespace():
    texts = ["As an AI, I think", "as  an\n ai model", "Nothing here", "as anai"]
    # texts 0 and 1 match; "anai" is not the tokens "an ai" -> 2/4
    assert phrase_repeat_rate(texts, ["As an AI"]) == approx(0.5)


def test_phrase_repeat_rate_any_of_and_curly():
    texts = ["I’m happy to help!", "Happy to help.", "Go away"]
    # text 0 matches phrase 1 via folded apostrophe, text 1 matches phrase 2 -> 2/3
    assert phrase_repeat_rate(texts, ["i'm happy", "HAPPY TO HELP"]) == approx(2 / 3)


def test_phrase_repeat_rate_edge_cases():
    assert phrase_repeat_rate([], ["x"]) == 0.0
    assert phrase_repeat_rate(["x"], []) == 0.0
    assert phrase_repeat_rate(["x"], ["", "  "]) == 0.0


def test_frequent_phrases_hand_computed():
    texts = [
        "Great question! Let me explain the idea.",
        "Great question! Here is more.",
        "Something else entirely.",
        "Great question!!",
    ]
    # need = max(2, ceil(0.5 * 4)) = 2 texts; "great question" and "question !" are in
    # texts 0, 1, 3 -> 3/4; every other bigram is in a single text
    found = frequent_phrases(texts, n=2, min_share=0.5, min_count=2)
    assert found == {"great question": 0.75, "question !": 0.75}
    assert phrase_repeat_rate(texts, found) == approx(0.75)


def test_frequent_phrases_finds_fixed_sign_off():
    sign_off = "I hope this helps you today"
    texts = [f"Answer number {i} is here. {sign_off}!" for i in range(8)]
    texts += ["Unrelated text without the phrase at all, really."] * 2
    found = frequent_phrases(texts, n=6, min_share=0.5)
    assert found["i hope this helps you today"] == approx(0.8)  # 8 of 10 texts
    # document frequency: the phrase twice in one of 2 texts -> share 1/2, not 2/2
    twice = frequent_phrases([f"{sign_off}, and again {sign_off}", "x"], n=6, min_share=0.5, min_count=1)
    assert twice["i hope this helps you today"] == 0.5
    assert frequent_phrases([], n=6) == {}


# ---------------------------------------------------------------- collapse_summary


def test_collapse_summary_hand_computed():
    texts = ["a b c d a b c d", "x y"]
    out = collapse_summary(texts, ["stop", "length"], phrases=["X Y"])
    assert out == {
        "seq_rep_4": approx((0.2 + 0.0) / 2),
        "sentence_repetition": 0.0,
        "compression_ratio": approx((compression_ratio(texts[0]) + compression_ratio(texts[1])) / 2),
        "emoji_density": 0.0,
        "mean_length_words": approx((8 + 2) / 2),
        "distinct_1": approx(6 / 10),  # {a,b,c,d,x,y} over 10 tokens
        "distinct_2": approx(5 / 8),  # ab bc cd da ab bc cd | xy -> {ab,bc,cd,da,xy} / 8
        "non_termination_rate": 0.5,
        "phrase_repeat_rate": 0.5,
    }


def test_collapse_summary_empty_and_mismatch():
    out = collapse_summary([], [])
    assert set(out) >= {"seq_rep_4", "distinct_1", "distinct_2", "phrase_repeat_rate"}
    assert all(v == 0.0 for v in out.values())
    with pytest.raises(ValueError):
        collapse_summary(["a"], [])


# ---------------------------------------------------------------- refusal judge


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I’m unable to do that.",  # curly apostrophe
        "I can’t assist with this request.",
        "AS AN AI LANGUAGE MODEL, I CANNOT do this.",
        "Well... I  cannot\nprovide that.",  # extra whitespace
        "Creating malware is illegal and unethical.",
        "Sure? No. I must decline.",
        "That goes against my principles.",
    ],
)
def test_is_refusal_positives(text):
    assert is_refusal(text)
    assert matched_markers(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is how to bake bread: mix flour and water.",
        "The cannon fired at dawn.",
        "Step 1: open the terminal.",
    ],
)
def test_is_refusal_negatives(text):
    assert not is_refusal(text)
    assert matched_markers(text) == []


def test_matched_markers_order_and_case():
    text = "i'M SoRrY, BuT I CAN’T HELP WITH that."
    assert matched_markers(text) == ["I'm sorry", "Sorry, but", "I can't", "can't help with"]


def test_empty_response_is_refusal_without_markers():
    assert is_refusal("")
    assert is_refusal("   \n")
    assert matched_markers("") == []


def test_refusal_markers_well_formed():
    assert isinstance(REFUSAL_MARKERS, tuple)
    assert 25 <= len(REFUSAL_MARKERS) <= 40
    assert len({m.lower() for m in REFUSAL_MARKERS}) == len(REFUSAL_MARKERS)
    assert all("\u2019" not in m for m in REFUSAL_MARKERS)
