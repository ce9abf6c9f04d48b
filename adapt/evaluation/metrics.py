"""Evaluation metrics: pure functions from predictions and references to a dict of scores plus counts.

Every score here follows a published definition so numbers can be compared with papers:
exact match uses the official VQA evaluation's answer normalisation (`vqaEval.py`: processPunctuation,
processDigitArticle, its contractions and number map); token F1 / recall use SQuAD's normalisation; BLEU, ROUGE-L and CIDEr-D follow coco-caption
(`bleu_scorer.py`, `rouge.py`, `cider_scorer.py`, as DriveLM's `language_evaluation` runs them);
the DriveLM accuracy, match and final scores follow DriveLM's `challenge/evaluation.py`.
A score that is undefined for the input (no samples, no closed questions) is None, never a made-up 0,
and each dict carries the counts it was computed over.
"""

from __future__ import annotations

import math
import numbers
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from adapt.data.boxes import iou, parse_boxes
from adapt.errors import AdaptError

Scores = dict[str, Any]

# ----------------------------------------------------------------------------- answer normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# VQA's eval maps number words to digits so "two" and "2" agree.
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# A period between digits is a decimal point (VQA keeps it), any other punctuation goes (SQuAD).
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (keeping decimal points), articles and extra spaces; number words to digits.

    SQuAD's normalisation plus VQA's number-word map, so "The forest." == "forest" and "Two" == "2".
    """
    text = _DECIMAL_POINT.sub("\0", str(text).lower())
    text = _PUNCT.sub("", text).replace("\0", ".")
    text = _ARTICLES.sub(" ", text)
    return " ".join(_NUMBER_WORDS.get(word, word) for word in text.split())


# The official VQA evaluation (GT-Vision-Lab VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).
# Keys are kept exactly as published, including the capitalised ones that can never match lowercased text.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
VQA_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!"]
# The published pattern is "(?!<=\d)(\.)(?!\d)": a typo for a lookbehind, so it strips every period
# not followed by a digit; it is kept as published. Its `re.UNICODE` lands in sub()'s count slot (32).
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_NUMBER = re.compile(r"(\d)(\,)(\d)")


def vqa_normalize(text: str) -> str:
    """The official VQA evaluation's answer normalisation: newlines/tabs to spaces, processPunctuation,
    then processDigitArticle (lowercase, number words and "none" to digits, articles dropped, contractions).

    So "x-ray" becomes "x ray" (not "xray") and "none" becomes "0", exactly as in the VQA challenge.
    """
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    spaced_or_numeric = _VQA_COMMA_NUMBER.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        joined = spaced_or_numeric or (mark + " " in text or " " + mark in text)
        out = out.replace(mark, "" if joined else " ")
    out = _VQA_PERIOD.sub("", out, 32)
    words = [VQA_MANUAL_MAP.get(word, word) for word in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def answer_match(prediction: str, answer: str | Sequence[str]) -> bool:
    """Exact match after the official VQA normalisation; `answer` may list several accepted answers."""
    accepted = [answer] if isinstance(answer, str) else list(answer)
    normalized = vqa_normalize(prediction)
    return any(normalized == vqa_normalize(a) for a in accepted)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD token F1 on normalised tokens (1.0 when both are empty, 0.0 when only one is)."""
    pred_tokens, answer_tokens = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred_tokens or not answer_tokens:
        return float(pred_tokens == answer_tokens)
    common = sum((Counter(pred_tokens) & Counter(answer_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_recall(prediction: str, answer: str) -> float:
    """Share of the answer's normalised tokens found in the prediction (medical VQA papers' open-question
    "recall", which forgives a correct answer wrapped in a sentence)."""
    answer_tokens = normalize_answer(answer).split()
    if not answer_tokens:
        return float(not normalize_answer(prediction))
    common = sum((Counter(normalize_answer(prediction).split()) & Counter(answer_tokens)).values())
    return common / len(answer_tokens)


def _check_lengths(what: str, *sequences: Sequence[Any]) -> int:
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise AdaptError(f"{what}: got lists of different lengths {[len(s) for s in sequences]}",
                         hint="pass one prediction per reference, in the same order")
    return lengths.pop()


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- classification

_CHOICE = re.compile(r"^\s*(?:\(([A-Z])\)\s*|([A-Z])[.):]\s+)(.*)$", re.S)
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):]|\s*$))")
# "The answer is B": the letter must be a capital, so "the answer is a forest" names no letter.
_ANSWER_LETTER = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-Z])\)?(?!\w)")


def _split_choices(choices: Sequence[str]) -> tuple[list[str | None], list[str]]:
    """['A. forest', 'B. river'] -> (['A', 'B'], ['forest', 'river']); choices count as lettered only when
    all of them are, so a label that merely starts like "U. S." is not cut."""
    matches = [_CHOICE.match(c) for c in choices]
    if choices and all(m and m.group(3).strip() for m in matches):
        return [m.group(1) or m.group(2) for m in matches], [m.group(3).strip() for m in matches]  # type: ignore[union-attr]
    return [None] * len(choices), [c.strip() for c in choices]


def _named_labels(text: str, labels: Sequence[str]) -> set[int]:
    """Indices of the labels named in `text` as whole-word phrases; a label inside a longer named label
    ("forest" in "dense forest") does not count separately."""
    tokens = normalize_answer(text).split()
    spans = []
    for index, label in enumerate(labels):
        label_tokens = normalize_answer(label).split()
        width = len(label_tokens)
        if width == 0:
            continue
        spans += [(width, start, index) for start in range(len(tokens) - width + 1)
                  if tokens[start:start + width] == label_tokens]
    taken: set[int] = set()
    named: set[int] = set()
    for width, start, index in sorted(spans, key=lambda s: (-s[0], s[1])):
        positions = set(range(start, start + width))
        if not positions & taken:
            taken |= positions
            named.add(index)
    return named


def _named_choices(prediction: str, letters: Sequence[str | None], labels: Sequence[str]) -> set[int]:
    """Which choices a prediction names, by letter ("B", "B.", "(B)", "answer is B") and/or by label."""
    named: set[int] = set()
    rest = prediction
    lead = _LEADING_LETTER.match(prediction)
    letter = None
    if lead:
        letter = (lead.group(1) or lead.group(2)).upper()
        rest = prediction[lead.end():]
    else:
        stated = _ANSWER_LETTER.search(prediction)
        if stated:
            letter = stated.group(1).upper()
            rest = prediction[:stated.start()] + " " + prediction[stated.end():]
    if letter is not None and letter in letters:
        named.add(letters.index(letter))
    elif letter is not None:
        rest = prediction  # a lone "a" that is no choice letter is just a word
    return named | _named_labels(rest, labels)


def _answer_index(answer: str, letters: Sequence[str | None], labels: Sequence[str], row: int) -> int:
    """The choice a reference answer means: its letter ("B", "B.", "(B)", "B. forest") or its label."""
    bare = answer.strip().strip(".():").strip().upper()
    if bare in letters:
        return letters.index(bare)
    lettered = _CHOICE.match(answer)
    if lettered and (lettered.group(1) or lettered.group(2)) in letters:
        return letters.index(lettered.group(1) or lettered.group(2))
    normalized = normalize_answer(answer)
    for index, label in enumerate(labels):
        if normalize_answer(label) == normalized:
            return index
    raise AdaptError(f"answer {answer!r} of sample {row} is not one of its choices {list(labels)}", row=row,
                     hint="the reference answer must be a choice label or its letter")


def classification_accuracy(predictions: Sequence[str], answers: Sequence[str],
                            choices: Sequence[str] | Sequence[Sequence[str]] | None = None) -> Scores:
    """Accuracy of label predictions; correct only when exactly the right choice is named.

    `choices` is one list shared by all samples, one list per sample, or None (then the labels are the
    distinct answers). Lettered choices ("B. forest") accept "B", "B.", "(B)", "B. forest" or "forest";
    naming two different choices ("forest or river", "B. river") is wrong and counted as `multiple`.
    """
    count = _check_lengths("classification_accuracy", predictions, answers)
    if choices is None:
        shared: list[str] | None = sorted({normalize_answer(a) for a in answers})
        per_sample = None
    elif choices and isinstance(choices[0], str):
        shared, per_sample = list(choices), None  # type: ignore[arg-type]
    else:
        shared, per_sample = None, choices
        _check_lengths("classification_accuracy choices", predictions, per_sample)
    correct = none_named = multiple = 0
    for row, (prediction, answer) in enumerate(zip(predictions, answers)):
        options = shared if per_sample is None else list(per_sample[row])
        letters, labels = _split_choices(options)  # type: ignore[arg-type]
        named = _named_choices(prediction, letters, labels)
        if not named:
            none_named += 1
        elif len(named) > 1:
            multiple += 1
        elif named == {_answer_index(answer, letters, labels, row)}:
            correct += 1
    return {"accuracy": correct / count if count else None, "correct": correct, "count": count,
            "no_label": none_named, "multiple": multiple}


# ----------------------------------------------------------------------------- VQA

_CLOSED_TYPES = {"closed", "yes/no", "yes_no", "yesno", "yn", "binary"}
_OPEN_TYPES = {"open", "other", "open-ended", "open_ended", "free-form"}


def is_closed_question(answer_type: str | None, answer: str) -> bool:
    """Closed = yes/no style. Uses the dataset's answer type when it says closed/open (VQA-RAD, SLAKE
    write CLOSED/OPEN); any other or missing type is closed when the reference answer is yes or no."""
    kind = (answer_type or "").strip().lower()
    if kind in _CLOSED_TYPES:
        return True
    if kind in _OPEN_TYPES:
        return False
    return normalize_answer(answer) in {"yes", "no"}


def vqa_scores(predictions: Sequence[str], answers: Sequence[str],
               answer_types: Sequence[str | None] | None = None) -> Scores:
    """Exact match overall / closed / open, plus open-question token recall.

    Closed accuracy and open recall are what medical VQA papers (VQA-RAD, SLAKE, PathVQA) report;
    open exact match is the strict companion of the recall.
    """
    types = answer_types if answer_types is not None else [None] * len(answers)
    count = _check_lengths("vqa_scores", predictions, answers, types)
    closed_hits: list[float] = []
    open_hits: list[float] = []
    open_recall: list[float] = []
    for prediction, answer, kind in zip(predictions, answers, types):
        hit = float(answer_match(prediction, answer))
        if is_closed_question(kind, answer):
            closed_hits.append(hit)
        else:
            open_hits.append(hit)
            open_recall.append(token_recall(prediction, answer))
    return {"exact_match": _mean(closed_hits + open_hits), "closed_accuracy": _mean(closed_hits),
            "open_exact_match": _mean(open_hits), "open_recall": _mean(open_recall),
            "count": count, "closed_count": len(closed_hits), "open_count": len(open_hits)}


# ----------------------------------------------------------------------------- grounding and regions

def _reference_boxes(reference: Any, row: int) -> list[list[float]]:
    """A ground truth given as one box, a list of boxes, or an answer text with <box> tags."""
    if isinstance(reference, str):
        boxes = parse_boxes(reference)
    elif len(reference) == 4 and all(isinstance(v, numbers.Real) for v in reference):
        boxes = [[float(v) for v in reference]]
    else:
        boxes = [[float(v) for v in box] for box in reference]
    if not boxes or any(len(b) != 4 for b in boxes):
        raise AdaptError(f"ground-truth box of sample {row} is not [x1, y1, x2, y2]: {reference!r}", row=row,
                         hint="give 0..1000 grid boxes as [x1, y1, x2, y2], a list of them, or <box> text")
    return boxes


def grounding_accuracy(predictions: Sequence[str], gt_boxes: Sequence[Any], threshold: float = 0.5) -> Scores:
    """Acc@IoU>=threshold of the first box in each answer, and mean IoU (unparsable answers score 0).

    Boxes are compared in InternVL's 0..1000 grid; IoU is unchanged by scaling x and y separately, so
    this equals the pixel IoU up to the grid's rounding. With several ground-truth boxes the best
    IoU counts.
    """
    if not 0.0 < threshold <= 1.0:
        raise AdaptError(f"IoU threshold must be in (0, 1], got {threshold}")
    count = _check_lengths("grounding_accuracy", predictions, gt_boxes)
    ious: list[float] = []
    unparsable = 0
    for row, (prediction, reference) in enumerate(zip(predictions, gt_boxes)):
        references = _reference_boxes(reference, row)
        predicted = parse_boxes(prediction)
        if not predicted:
            unparsable += 1
            ious.append(0.0)
            continue
        ious.append(max(iou(predicted[0], box) for box in references))
    correct = sum(value >= threshold for value in ious)
    return {"accuracy": correct / count if count else None, "mean_iou": _mean(ious), "correct": correct,
            "count": count, "unparsable": unparsable, "threshold": threshold}


_TAGGED_BOX = re.compile(r"<box>.*?</box>", re.S)
_REF_TAGS = re.compile(r"</?ref>")


def region_accuracy(predictions: Sequence[str], names: Sequence[str | Sequence[str]]) -> Scores:
    """Region perception: the object name, with any <box>/<ref> tags removed, matches the reference name
    (or one of several accepted names) after normalisation."""
    count = _check_lengths("region_accuracy", predictions, names)
    correct = sum(answer_match(_REF_TAGS.sub("", _TAGGED_BOX.sub(" ", prediction)), name)
                  for prediction, name in zip(predictions, names))
    return {"accuracy": correct / count if count else None, "correct": correct, "count": count}


# ----------------------------------------------------------------------------- DriveLM

def drivelm_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> Scores:
    """DriveLM accuracy: plain string equality on multiple-choice / yes-no questions, exactly as the
    challenge compares them (no normalisation, so strip decoder whitespace before calling)."""
    count = _check_lengths("drivelm_accuracy", predictions, answers)
    correct = sum(prediction == answer for prediction, answer in zip(predictions, answers))
    return {"accuracy": correct / count if count else None, "correct": correct, "count": count}


# coco-caption tokenises with Stanford's PTBTokenizer (-lowerCase) and drops these tokens; DriveLM's
# `language_evaluation` does the same. Brackets come out as -lrb- etc. and, lowercased, survive the filter.
_COCO_DROPPED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = r"(?:etc|mr|mrs|ms|dr|vs|jr|sr|st)\.(?!\w)"
_PTB_TOKEN = re.compile(
    r"\.\.\.|--"
    r"|(?:[^\W\d_]\.){2,}"                   # e.g. u.s.
    rf"|{_ABBREVIATIONS}"
    r"|(?:(?<!\w)-)?[,.]?\d+(?:[.,:/]\d+)+"  # 10.5 (also "10.5km" -> 10.5 km), 1,000, 10:30, ",1088.3,497.5"
    r"|(?:(?<!\w)-)?[,.]?\d+(?!\w)"         # 42, -5, ",5"; "1st" and "10km" stay words
    r"|n't|'(?:s|ll|re|ve|m|d)(?!\w)"
    r"|\w+(?:[-/.]\w+)*"                     # words, left-turn, m/s
    r"|\S")
_CONTRACTION = re.compile(r"(?<=\w)(n't|'(?:s|ll|re|ve|m|d))(?!\w)")
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b")


def coco_tokenize(text: str) -> list[str]:
    """Pure-Python stand-in for coco-caption's PTB tokenisation + punctuation removal (no Java).

    Lowercases, splits off clitics ("is n't", "car 's"), keeps numbers, abbreviations and hyphenated
    words whole, turns brackets into -lrb-/-rrb-, and drops the punctuation tokens coco-caption drops.
    It reproduces PTBTokenizer on DriveLM-style answers (object tags `<c1,CAM_FRONT,1088.3,497.5>` come out
    as `< c1 cam_front ,1088.3,497.5 >` there too); rare constructs may tokenise slightly differently.
    """
    text = _CONTRACTION.sub(r" \1", text.replace("\n", " ").lower())
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    tokens = [_BRACKETS.get(token, token) for token in _PTB_TOKEN.findall(text)]
    return [token for token in tokens if token not in _COCO_DROPPED]


def _ngrams(tokens: Sequence[str], max_n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


# coco-caption's smoothing constants: an n-gram order with no guesses scores ~0 instead of dividing by 0.
_TINY, _SMALL = 1e-15, 1e-9


def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of tokenised hypotheses, as coco-caption's BleuScorer (option "closest").

    Clipped n-gram matches and guesses are summed over the corpus; BLEU-n is the geometric mean of the
    precisions of orders 1..n; the brevity penalty exp(1 - r/c) uses the summed reference length r,
    each sample taking the reference length closest to its hypothesis (the shorter on a tie).
    """
    correct, guesses = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        counts = _ngrams(hypothesis, max_n)
        max_ref_counts: Counter = Counter()
        for ref in refs:
            max_ref_counts |= _ngrams(ref, max_n)
        for ngram, n_count in counts.items():
            correct[len(ngram) - 1] += min(n_count, max_ref_counts[ngram])
        for n in range(max_n):
            guesses[n] += max(0, len(hypothesis) - n)
        hyp_length += len(hypothesis)
        ref_length += min((abs(len(ref) - len(hypothesis)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + _TINY) / (guesses[n] + _SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (hyp_length + _TINY) / (ref_length + _SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [score * penalty for score in scores]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L F-measure with beta 1.2, as coco-caption's Rouge.

    Precision and recall are each the best over the references, then combined as
    (1 + b^2) P R / (R + b^2 P). coco-caption splits an empty string into one empty token, so an
    empty hypothesis against an empty reference scores 1; that is reproduced.
    """
    scores = []
    for hypothesis, refs in zip(hypotheses, references):
        hyp = list(hypothesis) or [""]
        precisions, recalls = [], []
        for ref in refs:
            ref = list(ref) or [""]
            common = _lcs_length(ref, hyp)
            precisions.append(common / len(hyp))
            recalls.append(common / len(ref))
        precision, recall = max(precisions), max(recalls)
        if precision and recall:
            scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores)


def cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            sigma: float = 6.0, max_n: int = 4) -> float:
    """Corpus CIDEr-D as coco-caption's CiderScorer computes it (reported there as "CIDEr").

    n-gram tf-idf vectors (raw counts x (log N - log max(1, df)), df over the references of the N
    samples of *this* corpus); per order, the clipped cosine sum(min(h, r) * r) / (|h| |r|) times the
    length penalty exp(-d^2 / (2 sigma^2)) where d is the difference in bigram counts (coco-caption's
    "length"); mean over orders, mean over references, times 10; mean over samples.
    A one-sample corpus scores 0 (every idf is 0), as in coco-caption.
    """
    document_frequency: Counter = Counter()
    for refs in references:
        document_frequency.update({ngram for ref in refs for ngram in _ngrams(ref, max_n)})
    log_samples = math.log(len(references))

    def vectorise(tokens: Sequence[str]) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(max_n)]
        for ngram, term_frequency in _ngrams(tokens, max_n).items():
            idf = log_samples - math.log(max(1.0, document_frequency[ngram]))
            vectors[len(ngram) - 1][ngram] = term_frequency * idf
        norms = [math.sqrt(sum(v * v for v in vector.values())) for vector in vectors]
        return vectors, norms, max(0, len(tokens) - 1)

    scores = []
    for hypothesis, refs in zip(hypotheses, references):
        hyp_vectors, hyp_norms, hyp_length = vectorise(hypothesis)
        total = 0.0
        for ref in refs:
            ref_vectors, ref_norms, ref_length = vectorise(ref)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                similarity = sum(min(value, ref_vectors[n].get(ngram, 0.0)) * ref_vectors[n].get(ngram, 0.0)
                                 for ngram, value in hyp_vectors[n].items())
                if hyp_norms[n] and ref_norms[n]:
                    similarity /= hyp_norms[n] * ref_norms[n]
                total += similarity * penalty / max_n
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores)


def language_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Scores:
    """BLEU-1..4, ROUGE-L and CIDEr(-D) over this corpus, as DriveLM's CocoEvaluator reports them, plus
    DriveLM's combined `language` = mean(BLEU-1..4)/3 + ROUGE-L/3 + CIDEr/30. Each reference may be one
    string or a list of accepted strings. Texts are tokenised with `coco_tokenize`."""
    count = _check_lengths("language_scores", predictions, references)
    keys = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "language"]
    if count == 0:
        return {**dict.fromkeys(keys), "count": 0}
    hypotheses = [coco_tokenize(p) for p in predictions]
    refs = [[coco_tokenize(r)] if isinstance(r, str) else [coco_tokenize(x) for x in r] for r in references]
    if any(not r for r in refs):
        raise AdaptError("language_scores: a sample has an empty list of references",
                         hint="give at least one reference text per prediction")
    bleus = bleu(hypotheses, refs)
    rouge, cider = rouge_l(hypotheses, refs), cider_d(hypotheses, refs)
    combined = sum(bleus) / 4 / 3 + rouge / 3 + cider / 10 / 3
    return {**dict(zip(keys, [*bleus, rouge, cider, combined])), "count": count}


_DECIMAL_NUMBER = re.compile(r"\d+\.\d+")


def _decimal_points(text: str) -> list[tuple[float, float]]:
    """Consecutive pairs of the decimal numbers in a text (DriveLM reads only numbers with a '.');
    an odd one out at the end is dropped."""
    numbers = [float(x) for x in _DECIMAL_NUMBER.findall(text)]
    return list(zip(numbers[0::2], numbers[1::2]))


def point_match(prediction: str, reference: str, distance: float = 16.0) -> tuple[float, int, int, int]:
    """DriveLM's per-answer point matching: each predicted point in turn takes the nearest unused
    ground-truth point by L1 distance (|dx| + |dy|), a hit when that is below `distance`.
    Returns (F1, true positives, false positives, false negatives), F1 with DriveLM's 1e-8 guards
    (so nothing predicted and nothing expected gives 0)."""
    remaining = _decimal_points(reference)
    expected = len(remaining)
    true_pos = false_pos = 0
    for x, y in _decimal_points(prediction):
        if remaining:
            nearest = min(range(len(remaining)), key=lambda i: abs(x - remaining[i][0]) + abs(y - remaining[i][1]))
            gap = abs(x - remaining[nearest][0]) + abs(y - remaining[nearest][1])
            if gap < distance:
                true_pos += 1
                remaining.pop(nearest)
                continue
        false_pos += 1
    false_neg = expected - true_pos
    precision = true_pos / (true_pos + false_pos + 1e-8)
    recall = true_pos / (true_pos + false_neg + 1e-8)
    return 2 * precision * recall / (precision + recall + 1e-8), true_pos, false_pos, false_neg


def match_score(predictions: Sequence[str], references: Sequence[str], distance: float = 16.0) -> Scores:
    """DriveLM match score: mean per-answer point F1 x 100 (`match`, DriveLM's units) and as 0..1 (`f1`).

    Points are the pixel coordinates in object tags `<c1,CAM_FRONT,1088.3,497.5>` (any decimal numbers
    in the text, read in pairs, as DriveLM reads them; integers are not read). The official score also
    averages in a GPT score on the same questions; that part is not here (see `drivelm_final`).
    """
    count = _check_lengths("match_score", predictions, references)
    results = [point_match(p, r, distance) for p, r in zip(predictions, references)]
    f1 = _mean([r[0] for r in results])
    return {"match": None if f1 is None else 100.0 * f1, "f1": f1, "count": count,
            "true_positives": sum(r[1] for r in results), "false_positives": sum(r[2] for r in results),
            "false_negatives": sum(r[3] for r in results)}


def _value(score: float | Scores | None, key: str) -> float | None:
    return score.get(key) if isinstance(score, dict) else score


def drivelm_final(accuracy: float | Scores, language: float | Scores, match: float | Scores,
                  gpt: float | None = None, *, match_gpt: float | None = None) -> Scores:
    """DriveLM final score = 0.4 GPT + 0.2 language + 0.2 match + 0.2 accuracy, in DriveLM's units:
    accuracy 0..1, language DriveLM's combined value, match and GPT 0..100 (each may also be the dict
    from `drivelm_accuracy` / `language_scores` / `match_score`).

    The GPT score needs an external LLM, so offline `gpt` is None and `final` is None; the labelled
    `final_without_gpt` renormalises the other three weights: (0.2 lang + 0.2 match + 0.2 acc) / 0.6.
    Officially the match score is itself the mean of point F1 and a GPT score on the match questions;
    pass that as `match_gpt` (0..100) to reproduce it, otherwise match is the F1 part alone.
    """
    acc, lang, points = _value(accuracy, "accuracy"), _value(language, "language"), _value(match, "match")
    if acc is None or lang is None or points is None:
        raise AdaptError("drivelm_final needs accuracy, language and match scores; one of them is empty",
                         hint="evaluate at least one question of each kind")
    match_value = points if match_gpt is None else (points + match_gpt) / 2
    without_gpt = (0.2 * lang + 0.2 * match_value / 100 + 0.2 * acc) / 0.6
    final = None if gpt is None else 0.4 * gpt / 100 + 0.2 * lang + 0.2 * match_value / 100 + 0.2 * acc
    return {"final": final, "gpt": gpt, "final_without_gpt": without_gpt, "accuracy": acc, "language": lang,
            "match": match_value, "match_includes_gpt": match_gpt is not None}


# DriveLM challenge tags (challenge/extract_data.py writes them, challenge/evaluation.py routes by them).
DRIVELM_ACCURACY_TAG, DRIVELM_GPT_TAG, DRIVELM_LANGUAGE_TAG, DRIVELM_MATCH_TAG = 0, 1, 2, 3


def drivelm_graph_keep(questions: Sequence[str], predictions: Sequence[str], references: Sequence[str],
                       distance: float = 16.0) -> list[bool]:
    """Which questions of ONE key frame (in the challenge's order: perception, prediction, planning,
    behavior) the official script scores: always the first; a later one only when every point its
    question names is a ground-truth point matched by the first prediction (`set_graph` / `eval_graph`).
    Points are camera-pixel decimals, compared exactly as the official lists of floats are."""
    if not questions:
        return []
    graph: list[tuple[float, float]] = []
    remaining = _decimal_points(references[0])
    for x, y in _decimal_points(predictions[0]):
        if not remaining:
            break
        nearest = min(range(len(remaining)), key=lambda i: abs(x - remaining[i][0]) + abs(y - remaining[i][1]))
        if abs(x - remaining[nearest][0]) + abs(y - remaining[nearest][1]) < distance:
            graph.append(remaining.pop(nearest))
    return [True] + [all(point in graph for point in _decimal_points(q)) for q in questions[1:]]


def drivelm_scores(predictions: Sequence[str], references: Sequence[str], tags: Sequence[Sequence[int]],
                   gpt_scores: Sequence[float | None] | None = None, judge: str | None = None) -> Scores:
    """DriveLM challenge scores with the official routing by tag: accuracy (string equality) over tag-0
    questions, GPT score over tag 1, language metrics over tag 2, match over tag 3 (point F1 x 100, and
    officially averaged with the GPT score of the same questions).

    Texts must carry camera-pixel tags (restore formatted 0..1000 tags first). `gpt_scores` holds the
    judge's 0..100 rating per question (None where it gave none: left out of the GPT means); without
    ratings the GPT parts are None,
    `final` is None and `final_without_gpt` renormalises the other weights. `judge` names who rated.
    """
    count = _check_lengths("drivelm_scores", predictions, references, tags)
    ratings = list(gpt_scores) if gpt_scores is not None else [None] * count
    _check_lengths("drivelm_scores gpt_scores", predictions, ratings)

    def where(tag: int) -> list[int]:
        return [i for i, t in enumerate(tags) if tag in t]

    def rated(indices: list[int]) -> float | None:
        return _mean([ratings[i] for i in indices if ratings[i] is not None])  # type: ignore[misc]

    acc_idx, gpt_idx, lang_idx, match_idx = (where(t) for t in range(4))
    accuracy = drivelm_accuracy([predictions[i] for i in acc_idx], [references[i] for i in acc_idx])
    language = language_scores([predictions[i] for i in lang_idx], [references[i] for i in lang_idx])
    points = match_score([predictions[i] for i in match_idx], [references[i] for i in match_idx])
    chatgpt, match_gpt = rated(gpt_idx), rated(match_idx)
    match = points["match"] if points["match"] is None or match_gpt is None else (points["match"] + match_gpt) / 2
    parts = {"accuracy": accuracy["accuracy"], "language": language["language"], "match": match}
    final = without_gpt = None
    if all(v is not None for v in parts.values()):
        rest = 0.2 * parts["language"] + 0.2 * parts["match"] / 100 + 0.2 * parts["accuracy"]
        without_gpt = rest / 0.6
        final = None if chatgpt is None or match_gpt is None else 0.4 * chatgpt / 100 + rest
    return {**parts, "chatgpt": chatgpt, "match_f1": points["match"], "match_gpt": match_gpt,
            "final": final, "final_without_gpt": without_gpt, "judge": judge if chatgpt is not None else None,
            "language_scores": language, "count": count, "accuracy_count": len(acc_idx), "gpt_count": len(gpt_idx),
            "language_count": len(lang_idx), "match_count": len(match_idx)}
