"""Metrics on hand-made predictions whose scores are worked out by hand in the comments.

Where pycocoevalcap is installed, BLEU / ROUGE-L / CIDEr are also checked for equality with its scorers,
and (with Java) the whole language score with coco-caption's own PTB tokenizer, as DriveLM runs it.
"""

from __future__ import annotations

import math
import shutil

import pytest

from adapt.errors import AdaptError
from adapt.evaluation.metrics import (
    answer_match,
    classification_accuracy,
    coco_tokenize,
    drivelm_accuracy,
    drivelm_final,
    grounding_accuracy,
    language_scores,
    match_score,
    normalize_answer,
    region_accuracy,
    token_f1,
    token_recall,
    vqa_scores,
)

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("text", "expected"), [
    ("The  Forest!", "forest"),
    ("an apple, a pear", "apple pear"),
    ("Two cars.", "2 cars"),
    ("3.5 cm.", "3.5 cm"),
    ("Yes", "yes"),
    ("", ""),
])
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_answer_match_and_token_f1() -> None:
    assert answer_match("The liver.", "liver")
    assert answer_match("two", ["2", "pair"])
    assert not answer_match("left lung", "lung")
    # pred tokens [big, red, car], answer [red, car]: 2 common, P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8
    assert token_f1("the big red car", "red car") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0
    assert token_f1("", "car") == 0.0
    assert token_f1("bus", "car") == 0.0
    # answer [right, lung], prediction has "lung" only: recall 1/2
    assert token_recall("the left lung", "right lung") == pytest.approx(0.5)


# ----------------------------------------------------------------------------- classification

LETTERED = ["A. forest", "B. river", "C. dense forest"]


@pytest.mark.parametrize(("prediction", "correct"), [
    ("A", True), ("A.", True), ("(A)", True), ("A. forest", True), ("forest", True), ("Forest.", True),
    ("The answer is A", True), ("I think it is a forest", True),
    ("B", False), ("river", False),
    ("forest or river", False),   # names two labels
    ("A. river", False),          # letter and label disagree: two choices named
    ("dense forest", False),      # the longer label C, not A
    ("", False),
])
def test_classification_lettered_choices(prediction: str, correct: bool) -> None:
    for answer in ("A. forest", "A", "forest"):
        result = classification_accuracy([prediction], [answer], LETTERED)
        assert result["correct"] == int(correct), (prediction, answer)


def test_classification_counts_and_vocabulary_from_answers() -> None:
    predictions = ["forest", "River", "forest and river", "lake", "I am not sure"]
    answers = ["forest", "river", "forest", "lake", "lake"]
    result = classification_accuracy(predictions, answers)
    # labels are {forest, river, lake}: 3 right, one names two labels, one names none
    assert result == {"accuracy": 3 / 5, "correct": 3, "count": 5, "no_label": 1, "multiple": 1}


def test_classification_per_sample_choices_and_errors() -> None:
    choices = [["A. cat", "B. dog"], ["A. lung", "B. liver", "C. heart"]]
    result = classification_accuracy(["B", "C. heart"], ["B", "heart"], choices)
    assert result["correct"] == 2 and result["accuracy"] == 1.0
    with pytest.raises(AdaptError, match="not one of its choices"):
        classification_accuracy(["A"], ["E"], ["A. cat", "B. dog"])
    with pytest.raises(AdaptError, match="different lengths"):
        classification_accuracy(["A", "B"], ["A"], ["A. cat", "B. dog"])
    assert classification_accuracy([], [])["accuracy"] is None


# ----------------------------------------------------------------------------- VQA

def test_vqa_scores_split_closed_open() -> None:
    predictions = ["Yes.", "no", "The liver", "left lung"]
    answers = ["yes", "yes", "liver", "right lung"]
    result = vqa_scores(predictions, answers, ["CLOSED", "CLOSED", "OPEN", "OPEN"])
    # closed 1/2, open exact 1/2, overall 2/4; open recall (1 + 1/2) / 2 = 0.75
    assert result == {"exact_match": 0.5, "closed_accuracy": 0.5, "open_exact_match": 0.5,
                      "open_recall": 0.75, "count": 4, "closed_count": 2, "open_count": 2}


def test_vqa_all_closed_and_inferred_types() -> None:
    result = vqa_scores(["yes", "no", "yes"], ["yes", "yes", "no"])  # types inferred from yes/no answers
    assert result["closed_count"] == 3 and result["open_count"] == 0
    assert result["closed_accuracy"] == pytest.approx(1 / 3)
    assert result["open_exact_match"] is None and result["open_recall"] is None
    # an unknown type falls back to the answer: "count" with answer "3" is open
    assert vqa_scores(["3"], ["3"], ["count"])["open_count"] == 1


# ----------------------------------------------------------------------------- grounding and regions

def test_grounding_iou_by_hand() -> None:
    # [100,100,300,300] vs [200,200,400,400]: overlap 100x100 = 10000, union 40000 + 40000 - 10000 = 70000
    # [0,0,100,100] vs [0,0,100,50]: 5000 / 10000 = 0.5, exactly at the threshold (>= counts)
    predictions = ["<ref>car</ref><box>[[100, 100, 300, 300]]</box>",
                   "<box>[[0, 0, 100, 100]]</box>",
                   "I cannot find it",
                   "<box>[[0, 0, 10, 10], [500, 500, 600, 600]]</box>"]  # only the first box counts
    gts = [[200, 200, 400, 400], "<box>[[0, 0, 100, 50]]</box>", [0, 0, 10, 10], [500, 500, 600, 600]]
    result = grounding_accuracy(predictions, gts)
    assert result["correct"] == 1 and result["count"] == 4 and result["unparsable"] == 1
    assert result["accuracy"] == pytest.approx(0.25)
    assert result["mean_iou"] == pytest.approx((1 / 7 + 0.5 + 0 + 0) / 4)
    assert grounding_accuracy(predictions[:2], gts[:2], threshold=0.1)["correct"] == 2


def test_grounding_several_gt_boxes_and_edges() -> None:
    result = grounding_accuracy(["[[0, 0, 100, 100]]"], [[[500, 500, 600, 600], [0, 0, 100, 100]]])
    assert result["accuracy"] == 1.0 and result["mean_iou"] == 1.0
    assert grounding_accuracy([], [])["accuracy"] is None
    with pytest.raises(AdaptError):
        grounding_accuracy(["[[0, 0, 1, 1]]"], ["no box here"])
    with pytest.raises(AdaptError):
        grounding_accuracy(["[[0, 0, 1, 1]]"], [[0, 0, 1, 1]], threshold=0)


def test_region_accuracy() -> None:
    predictions = ["car<box>[[1, 2, 3, 4]]</box>", "<ref>Truck</ref>", "a bus", "car and truck"]
    names = ["car", ["lorry", "truck"], "car", "car"]
    assert region_accuracy(predictions, names) == {"accuracy": 0.5, "correct": 2, "count": 4}


# ----------------------------------------------------------------------------- DriveLM

def test_drivelm_accuracy_is_plain_equality() -> None:
    result = drivelm_accuracy(["A", "Yes.", "yes.", "B"], ["A", "Yes.", "Yes.", "C"])
    assert result == {"accuracy": 0.5, "correct": 2, "count": 4}


def test_coco_tokenize_like_ptb() -> None:
    # what Stanford PTBTokenizer -lowerCase + coco-caption's punctuation filter give for these
    assert coco_tokenize("Notice <c1,CAM_FRONT,1088.3,497.5>.") == [
        "notice", "<", "c1", "cam_front", ",1088.3,497.5", ">"]
    assert coco_tokenize("The ego vehicle's speed isn't 10.5 m/s; stop (now)!") == [
        "the", "ego", "vehicle", "'s", "speed", "is", "n't", "10.5", "m/s", "stop", "-lrb-", "now", "-rrb-"]
    assert coco_tokenize("") == []


def test_bleu_and_rouge_by_hand() -> None:
    result = language_scores(["the car turns left"], ["the red car turns right"])
    # unigrams: the, car, turns match -> p1 = 3/4; bigrams: only "car turns" -> p2 = 1/3; no trigram matches.
    # c = 4 < r = 5 -> brevity penalty exp(1 - 5/4) = exp(-0.25)
    penalty = math.exp(-0.25)
    assert result["bleu_1"] == pytest.approx(0.75 * penalty, rel=1e-6)            # 0.5841
    assert result["bleu_2"] == pytest.approx(math.sqrt(0.75 / 3) * penalty, rel=1e-6)  # 0.3894
    assert result["bleu_3"] < 1e-4 and result["bleu_4"] < 1e-4
    # LCS "the car turns" = 3: P = 3/4, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 1.098 / 1.68
    assert result["rouge_l"] == pytest.approx(1.098 / 1.68)
    assert result["cider"] == 0.0  # one-sample corpus: every idf is log(1) - log(1) = 0
    assert result["count"] == 1


def test_bleu_closest_reference_length() -> None:
    # hypothesis of 3 tokens, references of 4 and 2 tokens: both 1 away, the shorter (2) is taken,
    # so c = 3 > r = 2 and there is no brevity penalty: BLEU-1 = 3/3. (Taking 4 would give exp(1 - 4/3).)
    result = language_scores(["the car stops"], [["the car stops now", "car stops"]])
    assert result["bleu_1"] == pytest.approx(1.0)
    # references of 5 and 2 tokens for a 2-token hypothesis: the closest is 2 -> no penalty either
    assert language_scores(["car stops"], [["the red car stops now", "car stops"]])["bleu_1"] == pytest.approx(1.0)


def test_cider_identical_corpus_and_small_case() -> None:
    sentences = ["the car turns left at the junction", "a pedestrian crosses the road ahead",
                 "the ego vehicle keeps going straight"]
    identical = language_scores(sentences, sentences)
    assert identical["cider"] == pytest.approx(10.0)  # cosine 1 for each of the 4 orders, x10
    assert identical["bleu_4"] == pytest.approx(1.0) and identical["rouge_l"] == pytest.approx(1.0)
    # N = 2, every n-gram has df 1, so every weight is log 2 and cancels in the cosines.
    # sample 1 "red car" vs "red car": orders 1, 2 give 1, orders 3, 4 have no n-grams -> 10 * 2/4 = 5.
    # sample 2 "stop" vs "stop now": unigram cosine 1/sqrt(2), bigram counts 0 vs 1 -> penalty
    # exp(-1 / 72) -> 10 * (1/sqrt(2)) * exp(-1/72) / 4.
    small = language_scores(["red car", "stop"], ["red car", "stop now"])
    expected = (5 + 10 * math.exp(-1 / 72) / math.sqrt(2) / 4) / 2
    assert small["cider"] == pytest.approx(expected)


def test_language_combined_score_and_edges() -> None:
    result = language_scores(["going ahead", "", "the car stops"], ["Going ahead.", "stop", "the car stops"])
    # DriveLM's loop: BLEU-1..4 each / 4 / 3, ROUGE-L / 3, CIDEr / 10 / 3
    expected = sum(result[f"bleu_{n}"] for n in range(1, 5)) / 12 + result["rouge_l"] / 3 + result["cider"] / 30
    assert result["language"] == pytest.approx(expected)
    assert 0 < result["rouge_l"] < 1  # the empty prediction scores 0, the other two 1 -> 2/3
    assert result["rouge_l"] == pytest.approx(2 / 3)
    empty = language_scores([], [])
    assert empty["count"] == 0 and empty["cider"] is None and empty["language"] is None


def test_match_score_points_at_10_and_20_px() -> None:
    reference = "<c1,CAM_FRONT,100.0,200.0>, <c2,CAM_FRONT,500.0,300.0>"
    # c1 predicted 10 px off (matched), c2 20 px off (not): TP 1, FP 1, FN 1 -> P = R = 1/2, F1 = 1/2
    result = match_score(["<c1,CAM_FRONT,110.0,200.0> and <c2,CAM_FRONT,520.0,300.0>"], [reference])
    assert result["f1"] == pytest.approx(0.5, abs=1e-6) and result["match"] == pytest.approx(50.0, abs=1e-4)
    assert (result["true_positives"], result["false_positives"], result["false_negatives"]) == (1, 1, 1)
    # distance is L1: 10 px right and 10 px down is 20 (> 16) although only 14.1 px away
    assert match_score(["<c1,CAM_FRONT,110.0,210.0>"], ["<c1,CAM_FRONT,100.0,200.0>"])["true_positives"] == 0
    # exactly 16 is not below 16
    assert match_score(["<c1,CAM_FRONT,116.0,200.0>"], ["<c1,CAM_FRONT,100.0,200.0>"])["true_positives"] == 0


def test_match_score_uses_each_point_once_and_edges() -> None:
    # two predictions near one ground-truth point: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3
    result = match_score(["<c1,CAM_FRONT,101.0,200.0> <c2,CAM_FRONT,102.0,200.0>"], ["<c1,CAM_FRONT,100.0,200.0>"])
    assert result["f1"] == pytest.approx(2 / 3, abs=1e-6)
    # DriveLM reads only decimal numbers: integer coordinates are no points
    assert match_score(["<c1,CAM_FRONT,100,200>"], ["<c1,CAM_FRONT,100.0,200.0>"])["f1"] == pytest.approx(0.0)
    # nothing predicted, nothing expected: 0 (DriveLM's guards), averaged with a perfect answer -> 50
    both = match_score(["no objects", "<c1,CAM_BACK,5.5,6.5>"], ["none", "<c1,CAM_BACK,5.5,6.5>"])
    assert both["match"] == pytest.approx(50.0, abs=1e-4) and both["count"] == 2
    assert match_score([], [])["match"] is None


def test_drivelm_final() -> None:
    # 0.4 * 60/100 + 0.2 * 0.5 + 0.2 * 30/100 + 0.2 * 0.7 = 0.24 + 0.10 + 0.06 + 0.14 = 0.54
    with_gpt = drivelm_final(0.7, 0.5, 30.0, gpt=60.0)
    assert with_gpt["final"] == pytest.approx(0.54)
    offline = drivelm_final({"accuracy": 0.7}, {"language": 0.5}, {"match": 30.0})
    assert offline["final"] is None and offline["gpt"] is None
    assert offline["final_without_gpt"] == pytest.approx((0.10 + 0.06 + 0.14) / 0.6)
    # official match = mean of point F1 (30) and GPT on the match questions (50) = 40
    assert drivelm_final(0.7, 0.5, 30.0, match_gpt=50.0)["match"] == pytest.approx(40.0)
    with pytest.raises(AdaptError):
        drivelm_final({"accuracy": None}, 0.5, 30.0)


# ----------------------------------------------------------------------------- against pycocoevalcap

PREDICTIONS = ["The ego vehicle should keep going ahead at the same speed.", "Yes.",
               "There is a white car <c1,CAM_FRONT,1075.5,382.8> to the front of the ego vehicle.",
               "", "Slow down and turn left.", "the pedestrian crosses the road"]
REFERENCES = [["The ego vehicle should go ahead at the same speed.", "Keep going straight."], ["No."],
              ["There is a black sedan <c1,CAM_FRONT,1075.5,382.8> to the front of the ego vehicle."],
              ["Stop."], ["Turn left slowly."], ["a pedestrian is crossing the road", "the pedestrian crosses"]]


def test_scorers_equal_pycocoevalcap() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [" ".join(coco_tokenize(r)) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [" ".join(coco_tokenize(p))] for i, p in enumerate(PREDICTIONS)}
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    ours = language_scores(PREDICTIONS, REFERENCES)
    assert [ours[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleus, rel=1e-9, abs=1e-12)
    assert ours["rouge_l"] == pytest.approx(rouge, rel=1e-12)
    assert ours["cider"] == pytest.approx(cider, rel=1e-9)


def test_tokenizer_equals_coco_ptb_tokenizer() -> None:
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("coco-caption's PTB tokenizer needs Java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [t for refs in REFERENCES for t in refs] + PREDICTIONS + [
        "The ego vehicle's speed isn't 10.5 m/s; it's stopping--slowly!", "Don't go... I'll wait? (left) [x] {y}",
        "It cannot be 1,000 or 10:30, e.g. U.S. left-turn and/or 10.5km; 1st 10km -5 x,5 .5 50% $5",
        "'quoted' cars' wheels \"double\"", "Firstly, notice <c3,CAM_FRONT,1043.2,82.2>. Then <c2,CAM_BACK,800,450>."]
    tokenized = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, text in enumerate(texts):
        assert " ".join(coco_tokenize(text)) == tokenized[i][0], text
