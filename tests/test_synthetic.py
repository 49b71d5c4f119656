"""Specification of the synthetic demo data (`qwenvl.data.synthetic`).

Ground truth is checked by an independent oracle: each question is parsed back and answered from the scene's object
list, so a wrong answer or an ambiguous question fails here, not only a changed template.
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from qwenvl.data import load_image, load_official_finetune_json
from qwenvl.data import synthetic as syn
from qwenvl.eval.metrics import box_iou, strip_grounding
from qwenvl.grounding import parse_boxes


SEEDS = list(range(120)) + [1_000_000 + i for i in range(40)] + [2_000_000 + i for i in range(40)]


@pytest.fixture(scope="module")
def scenes() -> list[syn.Scene]:
    return [syn.make_scene(seed, 112) for seed in SEEDS]


def _matching(scene: syn.Scene, phrase: str) -> list[syn.SceneObject]:
    """Objects a definite phrase like "the red circle" / "the blue digit 7" / "the circle" / "the red object" refers
    to."""
    words = phrase.removeprefix("the ").split()
    color = words[0] if words[0] in syn.COLORS else None
    noun = " ".join(words[1:] if color else words)
    return [o for o in scene.objects if noun in (o.noun, "object") and (color is None or o.color == color)]


def _only(scene: syn.Scene, phrase: str) -> syn.SceneObject:
    found = _matching(scene, phrase)
    assert len(found) == 1, f"scene {scene.seed}: '{phrase}' matches {len(found)} objects"
    return found[0]


def oracle(scene: syn.Scene, prompt: str) -> str:
    """Answer a VQA prompt from the scene's ground truth, asserting that the question is unambiguous."""
    question = prompt.removesuffix(" Answer:")
    if m := re.fullmatch(r"What color is the (.+)\?", question):
        return _only(scene, "the " + m[1]).color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        found = [o for o in scene.objects if o.color == m[1]]
        assert len(found) == 1 and found[0].kind in syn.SHAPES
        return found[0].kind
    if m := re.fullmatch(r"Which digit is written in (\w+)\?", question):
        found = [o for o in scene.objects if o.kind == "digit" and o.color == m[1]]
        assert len(found) == 1
        return str(found[0].digit)
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        what = m[1]
        if what == "objects":
            return str(len(scene.objects))
        if what == "digits":
            return str(sum(o.kind == "digit" for o in scene.objects))
        if what.endswith(" objects"):
            return str(sum(o.color == what.split()[0] for o in scene.objects))
        shape = {plural: shape for shape, plural in syn.SHAPE_PLURALS.items()}[what]
        return str(sum(o.kind == shape for o in scene.objects))
    if m := re.fullmatch(r"Is (the .+) to the left or to the right of (the .+)\?", question):
        a, b = _only(scene, m[1]), _only(scene, m[2])
        assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0], "not separated horizontally"
        return "left" if a.box[2] <= b.box[0] else "right"
    if m := re.fullmatch(r"Is (the .+) above or below (the .+)\?", question):
        a, b = _only(scene, m[1]), _only(scene, m[2])
        assert a.box[3] <= b.box[1] or b.box[3] <= a.box[1], "not separated vertically"
        return "above" if a.box[3] <= b.box[1] else "below"
    raise AssertionError(f"unrecognised question {prompt!r}")


def _close(a, b, tol=1.0) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_scene_and_other_seeds_differ():
    first, again = syn.make_scene(42, 96), syn.make_scene(42, 96)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.objects == again.objects and first.background == again.background
    assert syn.make_scene(43, 96).image.tobytes() != first.image.tobytes()


def test_scene_objects_are_valid_and_uniquely_nameable(scenes):
    for scene in scenes:
        assert scene.image.size == (112, 112) and scene.image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 4
        assert scene.background in ("plain", "textured")
        names = [(o.color, o.noun) for o in scene.objects]
        assert len(set(names)) == len(names), f"scene {scene.seed}: duplicate colour+noun"
        for obj in scene.objects:
            assert obj.color in syn.COLORS
            assert obj.kind in syn.SHAPES or (obj.kind == "digit" and obj.digit in range(10))
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112
            # Legible when the demo downsizes 112 -> 56 px: at least ~5 px on the long side there.
            assert max(x2 - x1, y2 - y1) >= 10
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert box_iou(a.box, b.box) == 0.0, f"scene {scene.seed}: overlapping objects"


def test_objects_are_painted_inside_their_boxes_and_nowhere_else(scenes):
    """Pixels near a palette colour lie inside the box of an object of that colour; each box holds its colour."""
    for scene in scenes[:60]:
        pixels = np.asarray(scene.image, dtype=np.int32)
        inside_any = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            inside_any[y1:y2, x1:x2] = True
            region = pixels[y1:y2, x1:x2]
            close = np.abs(region - np.array(syn.COLORS[obj.color])).max(axis=-1) < 40
            assert close.mean() > 0.1, f"scene {scene.seed}: {obj.expression} not painted in its box"
        for rgb in syn.COLORS.values():
            strong = np.abs(pixels - np.array(rgb)).max(axis=-1) < 40
            assert not (strong & ~inside_any).any(), f"scene {scene.seed}: object colour outside every box"


def test_digits_are_real_handwriting_from_the_split_pool(scenes):
    digits = load_digits()
    for split, (start, stop) in syn.DIGIT_POOLS.items():
        assert set(digits.target[start:stop]) == set(range(10)), f"{split} pool lacks a digit class"
    assert (
        syn.DIGIT_POOLS["train"][1] <= syn.DIGIT_POOLS["val"][0]
        and syn.DIGIT_POOLS["val"][1] <= syn.DIGIT_POOLS["test"][0]
    )
    seen = set()
    for scene in scenes:
        for obj in scene.objects:
            if obj.kind == "digit":
                start, stop = syn.DIGIT_POOLS[scene.split]
                assert start <= obj.digit_index < stop
                assert digits.target[obj.digit_index] == obj.digit
                seen.add(scene.split)
    assert seen == {"train", "val", "test"}


def test_split_seed_ranges_are_disjoint():
    assert syn.scene_seed("train", 0) == 0 and syn.scene_seed("val", 0) == 1_000_000
    assert syn.scene_seed("test", 5, dataset_seed=2) == 2 * 3_000_000 + 2_000_000 + 5
    for dataset_seed in (0, 1, 7):
        for split in syn.SPLITS:
            for index in (0, 999_999):
                assert syn.split_of_seed(syn.scene_seed(split, index, dataset_seed)) == split
    ranges = {
        (seed, split): range(syn.scene_seed(split, 0, seed), syn.scene_seed(split, 999_999, seed) + 1)
        for seed in (0, 1)
        for split in syn.SPLITS
    }
    spans = sorted((r.start, r.stop) for r in ranges.values())
    assert all(stop <= next_start for (_, stop), (next_start, _) in zip(spans, spans[1:]))


def test_bad_scene_arguments_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        syn.make_scene(-1)
    with pytest.raises(ValueError, match="image_size"):
        syn.make_scene(0, image_size=16)
    with pytest.raises(ValueError, match="n_objects"):
        syn.make_scene(0, n_objects=5)
    with pytest.raises(ValueError, match="scene index"):
        syn.scene_seed("train", 1_000_000)
    with pytest.raises(ValueError, match="unknown split"):
        syn.scene_seed("dev", 0)
    with pytest.raises(ValueError, match="unknown task"):
        syn.make_samples(syn.make_scene(0), tasks=("ocr",))


def test_object_count_can_be_forced_at_small_sizes():
    for n in range(1, 5):
        for seed in range(10):
            scene = syn.make_scene(seed, 56, n_objects=n)
            assert len(scene.objects) == n


# ---------------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------------


def test_every_task_answer_matches_the_scene(scenes):
    qtypes = set()
    for scene in scenes:
        samples = {s.task: s for s in syn.make_samples(scene)}
        assert list(samples) == list(syn.TASKS)
        left_to_right = sorted(scene.objects, key=lambda o: ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2))

        cap = samples["caption"]
        assert cap.prompt == "Describe the image in English:"
        n = len(scene.objects)
        assert cap.answer.startswith(f"{['One', 'Two', 'Three', 'Four'][n - 1]} object")
        assert f"on a {scene.background} background: " in cap.answer
        listed = re.split(r", | and ", cap.answer.split(": ", 1)[1].removesuffix("."))
        assert listed == [f"a {o.color} {o.noun}" for o in left_to_right]

        grounded = samples["grounded_caption"]
        assert grounded.prompt == "Generate the caption in English with grounding:"
        assert strip_grounding(grounded.answer) == cap.answer
        parsed = parse_boxes(grounded.answer, scene.image_size)
        assert [ref for ref, _ in parsed] == [f"a {o.color} {o.noun}" for o in left_to_right]
        assert all(_close(box, o.box) for (_, box), o in zip(parsed, left_to_right))

        rec = samples["rec"]
        expression = re.fullmatch(r"<ref>(.+)</ref>", rec.prompt)[1]
        target = _only(scene, expression)
        assert rec.box == target.box
        ((ref, box),) = parse_boxes(rec.answer, scene.image_size)
        assert rec.answer.startswith(rec.prompt + "<box>") and ref == expression
        assert _close(box, target.box), f"scene {scene.seed}: {box} vs {target.box}"

        vqa = samples["vqa"]
        assert vqa.prompt.endswith(" Answer:")
        assert vqa.answer == vqa.short_answer == oracle(scene, vqa.prompt)
        qtypes.add(vqa.qtype)
    assert qtypes == set(syn.VQA_TYPES)


def test_samples_are_deterministic_and_independent_of_the_task_subset():
    scene = syn.make_scene(11)
    all_tasks = {s.task: s for s in syn.make_samples(scene)}
    assert syn.make_samples(scene, tasks=("rec",)) == [all_tasks["rec"]]
    assert syn.make_samples(syn.make_scene(11)) == list(all_tasks.values())


def _with_follow_ups(scene: syn.Scene, task: str, first_turn: tuple[str, ...], **kwargs) -> syn.Sample:
    """`task`'s sample of `scene` made with `kwargs`, checked to keep the one-turn sample's `first_turn` fields and
    to leave every other task's sample as it was."""
    single = {s.task: s for s in syn.make_samples(scene)}
    multi = {s.task: s for s in syn.make_samples(scene, **kwargs)}
    assert [getattr(multi[task], f) for f in first_turn] == [getattr(single[task], f) for f in first_turn]
    assert single[task].follow_ups == []
    assert {t: s for t, s in multi.items() if t != task} == {t: s for t, s in single.items() if t != task}
    return multi[task]


def test_a_multi_question_vqa_sample_adds_distinct_correct_questions_after_the_single_question(scenes):
    lengths = set()
    for scene in scenes:
        vqa = _with_follow_ups(scene, "vqa", ("prompt", "answer", "qtype"), vqa_questions=4)
        prompts = [vqa.prompt] + [prompt for prompt, _ in vqa.follow_ups]
        assert len(set(prompts)) == len(prompts) <= 4
        for prompt, answer in vqa.follow_ups:
            assert prompt.endswith(" Answer:") and answer == oracle(scene, prompt)
        lengths.add(len(prompts))
    assert 4 in lengths  # most scenes have four distinct questions; one-object scenes may have fewer


def test_a_multi_question_vqa_sample_is_a_multi_turn_conversation_in_the_official_format():
    scene = syn.make_scene(5, 112)
    vqa = {s.task: s for s in syn.make_samples(scene, vqa_questions=3)}["vqa"]
    turns = vqa.to_official("images/x.png")["conversations"]
    assert [t["from"] for t in turns] == ["user", "assistant"] * 3
    assert turns[0]["value"] == f"Picture 1: <img>images/x.png</img>\n{vqa.prompt}"
    assert [(u["value"], a["value"]) for u, a in zip(turns[2::2], turns[3::2])] == vqa.follow_ups


def test_a_multi_object_rec_sample_asks_for_the_other_objects_after_the_single_target(scenes):
    for scene in scenes:
        rec = _with_follow_ups(scene, "rec", ("prompt", "answer", "box"), rec_questions=3)
        # Up to two more objects, each named by its full expression and boxed where it is, none asked twice.
        assert len(rec.follow_ups) == min(2, len(scene.objects) - 1)
        by_expression = {f"<ref>{o.expression}</ref>": o for o in scene.objects}
        asked = [rec.prompt] + [prompt for prompt, _ in rec.follow_ups]
        assert len(set(asked)) == len(asked)
        for prompt, answer in rec.follow_ups:
            assert answer == prompt + syn.format_box(by_expression[prompt].box, scene.image_size)
    with pytest.raises(ValueError, match="rec_questions must be an integer >= 1, got 0"):
        syn.make_samples(scenes[0], rec_questions=0)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_the_number_of_vqa_questions_must_be_a_positive_integer(bad, tmp_path):
    with pytest.raises(ValueError, match="vqa_questions"):
        syn.make_samples(syn.make_scene(0), vqa_questions=bad)
    with pytest.raises(ValueError, match="vqa_questions"):
        syn.generate_dataset(tmp_path, n_train=1, n_val=0, n_test=0, vqa_questions=bad)


def test_the_minimal_expression_is_the_shortest_phrase_naming_its_object_alone(scenes):
    kinds = set()
    for scene in scenes:
        for target in scene.objects:
            phrase = syn.minimal_expression(scene, target)
            assert _only(scene, phrase) is target, (scene.seed, phrase)
            nouns = [o.noun for o in scene.objects]
            colors = [o.color for o in scene.objects]
            if nouns.count(target.noun) == 1:
                kind = "noun"
                assert phrase == f"the {target.noun}"
            elif colors.count(target.color) == 1:
                kind = "colour"
                assert phrase == f"the {target.color} object"
            else:
                kind = "full"
                assert phrase == target.expression
            kinds.add(kind)
    assert kinds == {"noun", "colour", "full"}


def test_minimal_rec_share_renames_that_share_of_rec_targets_and_changes_nothing_else(scenes):
    renamed = 0
    for scene in scenes:
        full = {s.task: s for s in syn.make_samples(scene)}
        assert syn.make_samples(scene, minimal_rec_share=0.0) == list(full.values())
        always = {s.task: s for s in syn.make_samples(scene, minimal_rec_share=1.0)}
        half = {s.task: s for s in syn.make_samples(scene, minimal_rec_share=0.5)}
        assert {t: s for t, s in half.items() if t != "rec"} == {t: s for t, s in full.items() if t != "rec"}
        target = _only(scene, full["rec"].prompt.removeprefix("<ref>").removesuffix("</ref>"))
        # Same target and box, named by the minimal phrase in the prompt and in the answer's ref.
        short = syn.minimal_expression(scene, target)
        assert always["rec"].prompt == f"<ref>{short}</ref>" and always["rec"].box == full["rec"].box == target.box
        assert always["rec"].answer == always["rec"].prompt + full["rec"].answer.removeprefix(full["rec"].prompt)
        assert half["rec"] in (full["rec"], always["rec"])
        renamed += half["rec"] == always["rec"] and half["rec"] != full["rec"]
    assert syn.make_samples(scenes[0], minimal_rec_share=0.5) == syn.make_samples(scenes[0], minimal_rec_share=0.5)
    changeable = sum(syn.make_samples(s, minimal_rec_share=1.0)[2] != syn.make_samples(s)[2] for s in scenes)
    assert 0.35 * changeable < renamed < 0.65 * changeable


def test_only_the_training_split_gets_minimal_rec_expressions(tmp_path):
    paths = syn.generate_dataset(tmp_path, n_train=12, n_val=6, n_test=6, image_size=64, seed=2, minimal_rec_share=1.0)
    info = json.loads(paths["info"].read_text(encoding="utf-8"))
    assert info["minimal_rec_share"] == {"train": 1.0, "val": 0.0, "test": 0.0}
    renamed = 0
    for split in syn.SPLITS:
        scenes = {row["image"]: row for row in _read_jsonl(paths[f"{split}_scenes"])}
        for sample in _read_jsonl(paths[f"{split}_samples"]):
            if sample["task"] != "rec":
                continue
            scene = syn.make_scene(scenes[sample["image"]]["seed"], 64)
            target = next(o for o in scene.objects if list(o.box) == sample["box"])
            expected = syn.minimal_expression(scene, target) if split == "train" else target.expression
            assert sample["prompt"] == f"<ref>{expected}</ref>", (split, sample["id"])
            renamed += expected != target.expression
    assert renamed > 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_the_minimal_rec_share_must_be_a_probability(bad, tmp_path):
    with pytest.raises(ValueError, match="minimal_rec_share"):
        syn.make_samples(syn.make_scene(0), minimal_rec_share=bad)
    with pytest.raises(ValueError, match="minimal_rec_share"):
        syn.generate_dataset(tmp_path, n_train=1, n_val=0, n_test=0, minimal_rec_share=bad)
    assert not any(tmp_path.iterdir())  # checked before anything is written


def test_preference_pairs_prefer_the_correct_answer(scenes):
    for scene in scenes:
        vqa, rec = syn.make_preference_pairs(scene)
        assert vqa.task == "vqa" and rec.task == "rec"
        truth = oracle(scene, vqa.prompt)
        assert vqa.chosen == truth and vqa.rejected != truth
        if "How many" in vqa.prompt:
            assert abs(int(vqa.rejected) - int(truth)) == 1 and int(vqa.rejected) >= 0
        if "color" in vqa.prompt:
            assert vqa.rejected in syn.COLORS
        if "digit is" in vqa.prompt:
            assert vqa.rejected in [str(d) for d in range(10)]

        expression = re.fullmatch(r"<ref>(.+)</ref>", rec.prompt)[1]
        target = _only(scene, expression)
        ((_, good),) = parse_boxes(rec.chosen, scene.image_size)
        ((_, bad),) = parse_boxes(rec.rejected, scene.image_size)
        assert _close(good, target.box)
        assert box_iou(bad, target.box) < 0.5
        assert all(0 <= v <= 112 for v in bad)


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, syn.generate_dataset(out, n_train=8, n_val=3, n_test=3, image_size=64, seed=3)


def test_finetune_json_is_the_original_qwen_vl_format(dataset):
    out, paths = dataset
    for split, n_scenes in (("train", 8), ("val", 3), ("test", 3)):
        rows = json.loads(paths[split].read_text(encoding="utf-8"))
        assert isinstance(rows, list) and len(rows) == n_scenes * len(syn.TASKS)
        assert len({row["id"] for row in rows}) == len(rows)
        for row in rows:
            assert set(row) == {"id", "conversations"}
            user, assistant = row["conversations"]
            assert user["from"] == "user" and assistant["from"] == "assistant"
            m = re.fullmatch(r"Picture 1: <img>(images/[\w.]+\.png)</img>\n(.+)", user["value"], re.DOTALL)
            assert m, user["value"]
            assert not Path(m[1]).is_absolute()
            with Image.open(paths[split].parent / m[1]) as image:
                assert image.size == (64, 64)
            assert isinstance(assistant["value"], str) and assistant["value"]


def test_finetune_json_loads_with_the_official_format_reader(dataset):
    out, paths = dataset
    rows = load_official_finetune_json(paths["test"], image_root=out)
    assert len(rows) == 3 * len(syn.TASKS)
    for row in rows:
        user, assistant = row["messages"]
        assert user["content"][0] == {"type": "image"} and user["content"][1]["type"] == "text"
        assert assistant["role"] == "assistant"
        (image,) = row["images"]
        assert load_image(image).size == (64, 64)


def test_jsonl_files_carry_the_ground_truth(dataset):
    out, paths = dataset
    scenes = {row["image"]: row for row in _read_jsonl(paths["train_scenes"])}
    assert len(scenes) == 8
    for row in scenes.values():
        rebuilt = syn.make_scene(row["seed"], 64)
        assert [o.to_dict() for o in rebuilt.objects] == row["objects"]
        assert Image.open(out / row["image"]).tobytes() == rebuilt.image.tobytes()

    samples = _read_jsonl(paths["train_samples"])
    official = json.loads(paths["train"].read_text(encoding="utf-8"))
    assert [s["id"] for s in samples] == [o["id"] for o in official]
    assert all(s["answer"] == o["conversations"][1]["value"] for s, o in zip(samples, official))

    for row in _read_jsonl(paths["train_ppo"]):
        assert row["task"] in ("vqa", "rec") and (out / row["image"]).is_file()
        if row["task"] == "vqa":
            assert row["answer"] == row["reference"] and row["box"] is None
        else:
            assert row["answer"] is None
            ((_, box),) = parse_boxes(row["reference"], row["image_size"])
            assert _close(box, row["box"])

    pairs = _read_jsonl(paths["train_preference"])
    assert len(pairs) == 2 * 8
    assert all(set(p) == {"id", "task", "image", "prompt", "chosen", "rejected"} for p in pairs)
    assert all(p["chosen"] != p["rejected"] and (out / p["image"]).is_file() for p in pairs)


def test_splits_are_disjoint_on_disk(dataset):
    out, paths = dataset
    info = json.loads(paths["info"].read_text(encoding="utf-8"))
    seeds, hashes = {}, {}
    for split in syn.SPLITS:
        rows = _read_jsonl(paths[f"{split}_scenes"])
        seeds[split] = {row["seed"] for row in rows}
        hashes[split] = {hashlib.sha256((out / row["image"]).read_bytes()).hexdigest() for row in rows}
        start, stop = info["splits"][split]["scene_seeds"]
        assert seeds[split] == set(range(start, stop))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not seeds[a] & seeds[b] and not hashes[a] & hashes[b]


def _assert_same_files(out: Path, root: Path) -> None:
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_same_arguments_give_byte_identical_files(dataset, tmp_path):
    out, _ = dataset
    again = syn.generate_dataset(tmp_path / "again", n_train=8, n_val=3, n_test=3, image_size=64, seed=3)
    _assert_same_files(out, again["info"].parent)
    other = syn.generate_dataset(tmp_path / "other", n_train=8, n_val=0, n_test=0, image_size=64, seed=4)
    assert other["train"].read_bytes() != (out / "train.json").read_bytes()
    assert json.loads(other["val"].read_text()) == []


def test_worker_processes_write_the_same_files(dataset, tmp_path):
    out, _ = dataset
    parallel = syn.generate_dataset(tmp_path / "parallel", n_train=8, n_val=3, n_test=3, image_size=64, seed=3,
                                    workers=2)
    _assert_same_files(out, parallel["info"].parent)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_the_number_of_workers_must_be_a_positive_integer(bad, tmp_path):
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        syn.generate_dataset(tmp_path, n_train=1, n_val=0, n_test=0, workers=bad)
    assert not (tmp_path / "images").exists()  # checked before anything is written


def test_only_the_training_split_gets_multi_question_vqa_and_rec_conversations(tmp_path):
    paths = syn.generate_dataset(tmp_path, n_train=6, n_val=3, n_test=3, image_size=64, seed=3, vqa_questions=3,
                                 rec_questions=4)
    info = json.loads(paths["info"].read_text(encoding="utf-8"))
    assert info["vqa_questions"] == {"train": 3, "val": 1, "test": 1}
    assert info["rec_questions"] == {"train": 4, "val": 1, "test": 1}
    for split in syn.SPLITS:
        official = {row["id"]: row for row in json.loads(paths[split].read_text(encoding="utf-8"))}
        rows = {row["id"]: row for row in load_official_finetune_json(paths[split], tmp_path)}
        for sample in _read_jsonl(paths[f"{split}_samples"]):
            n_turns = len(official[sample["id"]]["conversations"]) // 2
            if split == "train" and sample["task"] == "rec":
                assert n_turns == 1 + len(sample["follow_ups"] or [])  # one-object scenes: one turn
            elif split == "train" and sample["task"] == "vqa":
                assert n_turns == 1 + len(sample["follow_ups"]) >= 2
                # Loaded for training: one image, then every turn in order, later questions without an image.
                messages = rows[sample["id"]]["messages"]
                assert [m["role"] for m in messages] == ["user", "assistant"] * n_turns
                assert messages[2]["content"][0] == {"type": "text", "text": sample["follow_ups"][0][0]}
            else:
                assert n_turns == 1 and sample["follow_ups"] is None
    # The first question of each training conversation is the single-question dataset's.
    single = syn.generate_dataset(tmp_path / "single", n_train=6, n_val=0, n_test=0, image_size=64, seed=3)
    firsts = [(r["id"], r["prompt"], r["answer"]) for r in _read_jsonl(single["train_samples"])]
    assert firsts == [(r["id"], r["prompt"], r["answer"]) for r in _read_jsonl(paths["train_samples"])]


def test_a_drill_sample_asks_distinct_questions_of_its_type_only(scenes):
    sizes = set()
    for scene in scenes:
        drill = syn.drill_sample(scene, "position", 4, id_prefix="x")
        if len(scene.objects) == 1:
            assert drill is None  # a lone object has no position question
            continue
        if drill is None:
            continue  # objects overlapping on both axes: nothing to ask
        assert (drill.id, drill.task, drill.qtype) == ("x_position_drill", "position_drill", "position")
        turns = [(drill.prompt, drill.answer)] + drill.follow_ups
        assert drill.short_answer == drill.answer and len({prompt for prompt, _ in turns}) == len(turns) <= 4
        for prompt, answer in turns:
            assert re.fullmatch(r"Is .+ (to the left or to the right of|above or below) .+\? Answer:", prompt)
            assert answer == oracle(scene, prompt)
        sizes.add(len(turns))
        assert syn.drill_sample(scene, "position", 4, id_prefix="x") == drill  # drawn from the scene's seed
    assert 4 in sizes


def test_a_count_drill_asks_about_one_absent_category_among_present_ones(scenes):
    positions = set()
    for scene in scenes:
        drill = syn.drill_sample(scene, "count", 4, id_prefix="x")
        turns = [(drill.prompt, drill.answer)] + drill.follow_ups
        answers = [answer for _, answer in turns]
        assert answers.count("0") == 1 and len({prompt for prompt, _ in turns}) == len(turns) <= 4
        assert all(answer == oracle(scene, prompt) for prompt, answer in turns)
        positions.add(answers.index("0"))
        assert syn.drill_sample(scene, "count", 4, id_prefix="x") == drill
        single = syn.drill_sample(scene, "count", 1, id_prefix="x")
        assert single.answer != "0" and not single.follow_ups  # one turn: a present category
    assert len(positions) > 1  # not always the same turn


def test_drill_rows_are_added_to_the_training_split_only_and_change_no_other_row(tmp_path):
    plain = syn.generate_dataset(tmp_path / "plain", n_train=12, n_val=3, n_test=3, image_size=64, seed=3,
                                 vqa_questions=2)
    drilled = syn.generate_dataset(tmp_path / "drill", n_train=12, n_val=3, n_test=3, image_size=64, seed=3,
                                   vqa_questions=2, drill=["position"])
    rows = _read_jsonl(drilled["train_samples"])
    drills = [row for row in rows if row["task"] == "position_drill"]
    assert 0 < len(drills) < 12 and all(row["id"].endswith("_position_drill") for row in drills)
    assert [row for row in rows if row["task"] != "position_drill"] == _read_jsonl(plain["train_samples"])
    official = json.loads(drilled["train"].read_text(encoding="utf-8"))
    assert [row for row in official if not row["id"].endswith("_drill")] == json.loads(
        plain["train"].read_text(encoding="utf-8"))
    for name in ("val", "val_samples", "test", "test_samples", "train_ppo", "train_preference"):
        assert drilled[name].read_bytes() == plain[name].read_bytes()
    info = json.loads(drilled["info"].read_text(encoding="utf-8"))
    assert info["drill"] == {"train": ["position"], "val": [], "test": []}
    assert "drill" not in json.loads(plain["info"].read_text(encoding="utf-8"))


@pytest.mark.parametrize("bad", ["position", ["where"], ["count", "count"], [3]])
def test_drill_must_name_distinct_vqa_types(bad, tmp_path):
    with pytest.raises(ValueError, match="drill"):
        syn.generate_dataset(tmp_path, n_train=1, n_val=0, n_test=0, drill=bad)
    assert not (tmp_path / "train.json").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_train": -1}, "n_train"),
        ({"n_val": 1.5}, "n_val"),
        ({"seed": -2}, "seed"),
        ({"image_size": 20}, "image_size"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs, message):
    arguments = {"n_train": 1, "n_val": 1, "n_test": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        syn.generate_dataset(tmp_path, **arguments)


# ---------------------------------------------------------------------------------------------------------------------
# Dense patch targets (the demo's ViT pre-training)
# ---------------------------------------------------------------------------------------------------------------------


def test_patch_targets_name_the_object_under_each_patch_centre_and_its_box(scenes):
    grid = 8
    for scene in scenes:
        row = scene.to_dict()
        classes, boxes = syn.patch_targets(row, grid)
        side = scene.image_size[0]
        background = len(syn.PATCH_CLASSES)
        assert classes.shape == (grid * grid,) and boxes.shape == (grid * grid, 4)
        for index in range(grid * grid):
            cx, cy = ((index % grid) + 0.5) / grid * side, ((index // grid) + 0.5) / grid * side
            under = [o for o in scene.objects if o.box[0] <= cx < o.box[2] and o.box[1] <= cy < o.box[3]]
            if not under:
                assert classes[index] == background and not boxes[index].any()
                continue
            (obj,) = under  # boxes never overlap
            assert syn.PATCH_CLASSES[classes[index]] == f"{obj.color} {obj.noun}"
            assert _close(tuple(boxes[index] * side), obj.box, tol=1e-3)  # absolute: the same for all its patches


def test_patch_classes_cover_every_colour_shape_and_digit():
    assert len(syn.PATCH_CLASSES) == len(syn.COLORS) * (len(syn.SHAPES) + 10) == len(set(syn.PATCH_CLASSES))
    with pytest.raises(ValueError, match="grid"):
        syn.patch_targets(syn.make_scene(0).to_dict(), 0)
