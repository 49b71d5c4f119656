"""Evaluation metrics with the protocols of the Qwen-VL paper's benchmarks, implemented from their definitions.

- Referring-expression comprehension: Acc@0.5 (`rec_accuracy`), as the original RefCOCO evaluation.
- VQA: accuracy with the VQAv2 answer normalisation (`normalize_vqa_answer`, `vqa_score`, `vqa_accuracy`).
- Captioning: CIDEr-D (`cider_d`), numerically the score of the coco-caption toolkit's "CIDEr" scorer on the same
  tokens. The maintained package (pycocoevalcap) is a 100 MB wheel that tokenises through a Java subprocess;
  this implementation needs neither and uses a PTB-like tokeniser in Python (`tokenize_caption`).
- Reward models: pairwise accuracy (`pairwise_accuracy`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence

from ..grounding import parse_boxes


Box = tuple[float, float, float, float]

# ---------------------------------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------------------------------


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes in continuous coordinates (area = w * h, no +1).

    A box without area has IoU 0 with everything, itself included.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


# The original evaluation took the first "(x1,y1),(x2,y2)" of the decoded text whatever the tags around it (decoding
# with skip_special_tokens drops <box> and </box>). Only numeric pairs count here, so a parenthesis inside a ref
# phrase does not turn a correct answer into a miss.
_COORDINATE_PAIR = re.compile(r"\(\s*\d+\s*,\s*\d+\s*\)\s*,\s*\(\s*\d+\s*,\s*\d+\s*\)")


def first_box(text: str, image_size: Sequence[float]) -> Box | None:
    """The first box of a model answer in pixels, or `None` when there is none.

    The box is the first `(x1,y1),(x2,y2)` pair of integers in the text, with or without `<box>` tags, as in the
    original protocol. Its coordinates are converted by `qwenvl.grounding.parse_boxes` at the default scale:
    integers in [0, 1000) of the width/height, mapped to the centre of their 1/1000 cell.
    """
    match = _COORDINATE_PAIR.search(text) if isinstance(text, str) else None
    if match is None:
        return None
    boxes = parse_boxes(f"<box>{match.group(0)}</box>", image_size)
    return tuple(boxes[0][1]) if boxes else None


def _check_lengths(**columns: Sequence) -> int:
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("cannot compute a metric over zero samples")
    return n


def _check_box(box: Sequence[float], where: str) -> Box:
    try:
        coords = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        coords = ()
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords) or coords[0] > coords[2] or coords[1] > coords[3]:
        raise ValueError(f"{where}: expected a pixel box [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {box!r}")
    return coords


def rec_accuracy(
    predictions: Sequence[str],
    targets: Sequence[Sequence[float]],
    image_sizes: Sequence[Sequence[float]],
    threshold: float = 0.5,
) -> dict[str, float | int]:
    """Referring-expression accuracy (Acc@0.5) with the original Qwen-VL protocol.

    For each sample the first box of the answer (`first_box`) is compared with the target pixel box; it is correct
    when IoU >= `threshold`. An answer without a parseable box is a miss, and every sample counts. `image_sizes` are
    `(width, height)` of each image, needed to map [0, 1000) coordinates to pixels. The original RefCOCO script
    divided by 999 instead of our 1000-cell convention, a difference below 0.1% of the image side.

    Returns `accuracy`, `n`, `n_correct`, `n_unparsed` and `mean_iou` (unparsed answers count as IoU 0).
    """
    n = _check_lengths(predictions=predictions, targets=targets, image_sizes=image_sizes)
    n_correct = n_unparsed = 0
    total_iou = 0.0
    for index, (prediction, target, size) in enumerate(zip(predictions, targets, image_sizes)):
        gold = _check_box(target, f"target {index}")
        predicted = first_box(prediction, size)
        if predicted is None:
            n_unparsed += 1
            continue
        iou = box_iou(predicted, gold)
        total_iou += iou
        n_correct += iou >= threshold
    return {
        "accuracy": n_correct / n,
        "n": n,
        "n_correct": n_correct,
        "n_unparsed": n_unparsed,
        "mean_iou": total_iou / n,
    }


# ---------------------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------------------

# The VQAv2 normalisation, as specified by the benchmark (lower case; punctuation; periods unless in a number;
# number words to digits; no articles; apostrophes restored in contractions).
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Contractions whose apostrophes an answer may have dropped. Forms whose apostrophe-less spelling is an ordinary
# word ("we'll" / "well", "it's" / "its", "i'll" / "ill" ...) are left out so that no real word gets rewritten.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am might've mightn't mightn't've must've mustn't
needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've
""".split()


def _contraction_repairs() -> dict[str, str]:
    """Every spelling of each contraction with some of its apostrophes missing -> the correct spelling."""
    repairs = {}
    for word in _CONTRACTIONS:
        positions = [i for i, ch in enumerate(word) if ch == "'"]
        for k in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, k):
                repairs["".join(ch for i, ch in enumerate(word) if i not in dropped)] = word
    return repairs


_VQA_CONTRACTION_REPAIRS = _contraction_repairs()


def normalize_vqa_answer(answer: str) -> str:
    """The VQAv2 canonical form of an answer, e.g. "Two dogs." -> "2 dogs", "The T-shirt" -> "t shirt".

    Steps, as the official evaluation: newlines and tabs become spaces; each of the marks ``;/[]"{}()=+\\_-><@`,?!``
    is deleted when it touches a space somewhere in the answer or when the answer contains a digit-comma-digit
    sequence ("1,000"), and otherwise becomes a space; a period is deleted unless a digit follows (so "2.5" stays);
    then, word by word in lower case: number words "none"/"zero" ... "ten" become digits, the articles a/an/the are
    dropped, and contractions missing an apostrophe get it back ("dont" -> "don't").
    """
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a string, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if mark in text:
            touches_space = f"{mark} " in text or f" {mark}" in text
            out = out.replace(mark, "" if delete_all or touches_space else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out)
    words = []
    for word in out.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTION_REPAIRS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy of one prediction, both sides normalised with `normalize_vqa_answer`.

    - One ground-truth answer (a string or a 1-element list): exact match, 1.0 or 0.0.
    - Several answers (VQAv2 has 10 per question): the official consensus score, min(#matches / 3, 1) computed
      against each subset that leaves one answer out, averaged. For 10 answers, 1, 2, 3 and >= 4 matching ones
      give 0.3, 0.6, 0.9 and 1.0.

    The official script skips normalisation when all ground-truth answers are identical (its answers were
    normalised when the dataset was built); normalising both sides always is equivalent for such data and correct
    for answers that were not.
    """
    references = [answers] if isinstance(answers, str) else list(answers)
    if not references or not all(isinstance(a, str) for a in references):
        raise ValueError(f"answers must be a string or a non-empty list of strings, got {answers!r}")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == predicted for a in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> dict[str, float | int]:
    """Mean `vqa_score` over all questions: `{"accuracy", "n"}`."""
    n = _check_lengths(predictions=predictions, answers=answers)
    total = 0.0
    for index, (prediction, gold) in enumerate(zip(predictions, answers)):
        try:
            total += vqa_score(prediction, gold)
        except (TypeError, ValueError) as error:
            raise ValueError(f"question {index}: {error}") from None
    return {"accuracy": total / n, "n": n}


# ---------------------------------------------------------------------------------------------------------------------
# Captioning: CIDEr-D
# ---------------------------------------------------------------------------------------------------------------------

_CLITIC_NT = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_CAPTION_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)+|[^\W_]+(?:[-/&'][^\W_]+)*|\.\.\.|--|\S")
# Tokens the coco-caption pipeline removes after PTB tokenisation (quotes, brackets and sentence punctuation).
_CAPTION_DROP = frozenset(
    {"'", "''", "`", "``", '"', "(", ")", "{", "}", "[", "]", ".", "?", "!", ",", ":", ";", "-", "--", "..."}
)


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased caption tokens, in the manner of the PTB tokenizer used by coco-caption, punctuation removed.

    Clitics are split ("don't" -> "do n't", "dog's" -> "dog 's"); hyphenated words and numbers such as "3.5" or
    "1,000" stay whole. Box/ref markup is not removed here: see `strip_grounding`.
    """
    text = text.lower().replace("\n", " ")
    text = _CLITIC.sub(r" '\1", _CLITIC_NT.sub(" n't", text))
    return [t for t in _CAPTION_TOKEN.findall(text) if t not in _CAPTION_DROP]


_BOX_SPAN = re.compile(r"<(box|quad)>.*?</\1>", re.DOTALL)
_REF_TAG = re.compile(r"</?ref>")


def strip_grounding(text: str) -> str:
    """A grounded caption as plain text: `<box>`/`<quad>` spans removed, `<ref>` tags dropped but their words kept."""
    return " ".join(_REF_TAG.sub("", _BOX_SPAN.sub("", text)).split())


def _ngram_counts(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, max_n + 1) for i in range(len(tokens) - k + 1))


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> dict[str, float | int | list[float]]:
    """CIDEr-D of one candidate caption per image against that image's reference captions.

    Definition (Vedantam et al. 2015, "D" variant as in coco-caption), on `tokenize_caption` tokens:

    - n-grams for n = 1..`max_n`, each weighted by TF-IDF: term count x (log(#images) - log(max(1, df))), df being
      the number of images whose references contain the n-gram (so the IDF comes from the evaluated references);
    - for each n and each reference: sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref (clipping),
      divided by the product of the two vectors' norms, times the length penalty exp(-(l_c - l_r)^2 / (2 sigma^2));
    - per image: the mean over n, averaged over the references, times 10. The corpus score is the mean over images.

    Like coco-caption, the length l of a caption is its number of bigrams (tokens - 1, or 0), which only differs
    from the token count for one-word captions. Because the IDF is log(#images), a corpus of a single image
    scores 0 whatever the captions; score at least two images.

    Returns `score` (corpus), `scores` (per image) and `n`.
    """
    n = _check_lengths(candidates=candidates, references=references)
    if max_n < 1 or sigma <= 0:
        raise ValueError(f"need max_n >= 1 and sigma > 0, got max_n={max_n}, sigma={sigma}")
    cand_counts: list[Counter] = []
    ref_counts: list[list[Counter]] = []
    for index, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise ValueError(f"candidate {index}: expected a string, got {type(candidate).__name__}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references {index}: expected a non-empty list of strings, got {refs!r}")
        cand_counts.append(_ngram_counts(tokenize_caption(candidate), max_n))
        ref_counts.append([_ngram_counts(tokenize_caption(r), max_n) for r in refs])

    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update(set().union(*refs))
    log_images = math.log(n)

    def weights(counts: Counter) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
        for gram, count in counts.items():
            vectors[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        length = sum(count for gram, count in counts.items() if len(gram) == 2)
        return vectors, norms, length

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        cand_vectors, cand_norms, cand_length = weights(cand)
        total = 0.0
        for ref in refs:
            ref_vectors, ref_norms, ref_length = weights(ref)
            penalty = math.exp(-((cand_length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(max_n):
                overlap = sum(
                    min(w, ref_vectors[k].get(gram, 0.0)) * ref_vectors[k].get(gram, 0.0)
                    for gram, w in cand_vectors[k].items()
                )
                if cand_norms[k] and ref_norms[k]:
                    overlap /= cand_norms[k] * ref_norms[k]
                total += overlap * penalty
        scores.append(10.0 * total / max_n / len(refs))
    return {"score": sum(scores) / n, "scores": scores, "n": n}


# ---------------------------------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------------------------------


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> dict[str, float | int]:
    """How often a reward model scores the chosen answer strictly above the rejected one.

    Ties count as errors, as in TRL's `RewardTrainer` accuracy, and are reported in `n_ties`. Also returns `n` and
    `mean_margin` (mean of chosen - rejected).
    """
    n = _check_lengths(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    wins = ties = 0
    margin = 0.0
    for index, (chosen, rejected) in enumerate(zip(chosen_scores, rejected_scores)):
        chosen, rejected = float(chosen), float(rejected)
        if not (math.isfinite(chosen) and math.isfinite(rejected)):
            raise ValueError(f"pair {index}: scores must be finite, got chosen={chosen}, rejected={rejected}")
        wins += chosen > rejected
        ties += chosen == rejected
        margin += chosen - rejected
    return {"accuracy": wins / n, "n": n, "n_ties": ties, "mean_margin": margin / n}


__all__ = [
    "box_iou",
    "first_box",
    "rec_accuracy",
    "normalize_vqa_answer",
    "vqa_score",
    "vqa_accuracy",
    "tokenize_caption",
    "strip_grounding",
    "cider_d",
    "pairwise_accuracy",
]
