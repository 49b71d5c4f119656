"""`qwenvl demo --quick`: every stage runs, outputs are written, stage 2 beats the untrained model, re-runs resume."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl.demo import STAGES, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True, seed=0)
    return out


def test_every_stage_runs_and_the_outputs_are_written(demo_dir):
    for stage in STAGES:
        assert (demo_dir / stage / "done.json").exists(), stage
    report = (demo_dir / "report.md").read_text()
    assert "stage 2: multi-task SFT" in report and "PPO-ptx" in report and "## Targets" in report
    assert "vision pre-training | object class from patches" in report


def test_the_tokenizer_was_trained_on_the_chat_template_too(demo_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "init", trust_remote_code=True)
    # Trained on bare prompts and answers, these words fell apart into single characters (44 of 85 VQA tokens).
    for word in ("system", "user", "assistant"):
        assert len(tokenizer.tokenize(word)) == 1, (word, tokenizer.tokenize(word))
    assert len(tokenizer.tokenize("You are a helpful assistant.")) <= 6  # was 19


def test_training_vqa_and_rec_rows_ask_the_recipes_number_of_questions_and_test_rows_one(demo_dir):
    from qwenvl.demo import CONFIG_PATH

    data = json.loads(CONFIG_PATH.read_text())["quick"]["data"]
    questions, referrals = data["vqa_questions"], data["rec_questions"]
    assert questions > 1 and referrals > 1
    for task, most in (("vqa", questions), ("rec", referrals)):
        for split, expected in (("train", most), ("test", 1)):
            rows = json.loads((demo_dir / "data" / f"{split}.json").read_text())
            rows = [row for row in rows if row["id"].endswith(f"_{task}")]
            assert rows and {len(row["conversations"]) // 2 for row in rows} <= set(range(1, expected + 1))
            assert max(len(row["conversations"]) // 2 for row in rows) == expected, (task, split)
    assert (f"({questions} questions per training VQA conversation; up to {referrals} objects per training REC "
            "conversation; a conversation of position questions only, one of color questions only, one of digit "
            "questions only and one of count questions only per training scene that has them)"
            ) in (demo_dir / "report.md").read_text()


def test_the_data_follow_the_recipes_minimal_rec_share_and_test_rows_keep_the_full_expression(demo_dir):
    from qwenvl.data.synthetic import COLORS
    from qwenvl.demo import CONFIG_PATH

    share = json.loads(CONFIG_PATH.read_text())["quick"]["data"]["minimal_rec_share"]
    info = json.loads((demo_dir / "data" / "dataset_info.json").read_text())
    assert info["minimal_rec_share"] == {"train": share, "val": 0.0, "test": 0.0}
    assert json.loads((demo_dir / "data" / "done.json").read_text())["minimal_rec_share"] == share
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (demo_dir / "data" / f"{split}_samples.jsonl").read_text().splitlines()]
        expressions = [row["prompt"].removeprefix("<ref>").removesuffix("</ref>") for row in rows if row["task"] == "rec"]
        full = [e.split()[1] in COLORS and not e.endswith(" object") for e in expressions]
        if split == "test" or share == 0:
            assert expressions and all(full), (split, expressions)


def test_vision_pretraining_changes_only_the_vision_tower(demo_dir):
    from safetensors.torch import load_file

    vision = json.loads((demo_dir / "vision" / "done.json").read_text())
    for key in ("object_patch_accuracy", "object_token_accuracy"):
        assert 0.0 <= vision[key] <= 1.0
    assert vision["box_error"] >= 0.0
    assert 0.0 <= vision["token_digit_accuracy"] <= 1.0  # the recipe's coordinate_digits targets
    assert 0.0 <= vision["token_color_accuracy"] <= 1.0 and 0.0 <= vision["token_noun_accuracy"] <= 1.0  # attributes
    assert "noun" in (demo_dir / "report.md").read_text()
    before = load_file(demo_dir / "init" / "model.safetensors")
    after = load_file(demo_dir / "vision" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("transformer.visual.") for name in changed), sorted(changed)
    assert any(".attn_pool." in name for name in changed) and any(".transformer.resblocks." in name for name in changed)
    assert "transformer.visual.attn_pool.pos_embed" not in changed  # the fixed sin-cos table stays fixed
    assert Image.open(demo_dir / "loss.png").size[0] > 500
    assert Image.open(demo_dir / "grounding.png").size[0] > 50
    data = json.loads((demo_dir / "data" / "dataset_info.json").read_text())
    assert data


def test_stage_two_beats_the_untrained_model(demo_dir):
    untrained = json.loads((demo_dir / "init" / "done.json").read_text())["metrics"]
    sft = json.loads((demo_dir / "sft" / "done.json").read_text())["metrics"]
    assert sft["answer_nll"]["mean"] < untrained["answer_nll"]["mean"] - 1.0
    for task, key in (("rec", "accuracy"), ("vqa", "accuracy"), ("caption", "cider_d")):
        assert sft[task][key] >= untrained[task][key]
    ppo = json.loads((demo_dir / "ppo" / "done.json").read_text())
    assert [entry["episode"] for entry in ppo["history"]] == [4, 8]  # 2 updates of 2 prompts x 2 responses
    for stage in ("sft", "ppo"):  # PPO's reward: the reward model's score plus the weighted task score
        assert ppo[f"reward_{stage}"] == pytest.approx(
            ppo[f"reward_model_{stage}"] + ppo["task_reward_weight"] * ppo[f"task_{stage}"])
        assert 0.0 <= ppo[f"task_{stage}"] <= 1.0
    assert ppo["reward_paired_se"] >= 0.0


def test_the_reward_model_is_scored_before_and_after_its_pairwise_training(demo_dir):
    reward = json.loads((demo_dir / "reward" / "done.json").read_text())
    before, after = reward["metrics_before_training"]["reward"], reward["metrics"]["reward"]
    assert before["n"] == after["n"] > 0  # the same held-out pairs
    assert 0.0 <= before["accuracy"] <= 1.0 and 0.0 <= after["accuracy"] <= 1.0
    report = (demo_dir / "report.md").read_text()
    assert f"before this stage's training: {before['accuracy']:.3f}" in report


def test_stage_two_has_phases_on_the_focus_tasks_only_then_a_refresh_on_every_task(demo_dir):
    from qwenvl.demo import CONFIG_PATH

    recipe = json.loads(CONFIG_PATH.read_text())["quick"]["sft"]
    sft = json.loads((demo_dir / "sft" / "done.json").read_text())
    assert [phase["tasks"] for phase in sft["focus"]] == [phase["tasks"] for phase in recipe["focus"]] == [
        ["rec"], ["vqa"], ["position_drill"], ["color_drill", "digit_drill", "count_drill"], ["rec"]]
    for phase in sft["focus"]:
        assert 0 < phase["n_rows"] < sft["n_rows"]  # the phase's task's rows only, out of every task's rows
    assert sft["refresh"]["n_rows"] == sft["n_rows"]  # every task's rows again
    phases = [(sft, recipe), *zip(sft["focus"], recipe["focus"]), (sft["refresh"], recipe["refresh"])]
    for phase, phase_recipe in phases:
        assert phase["n_rows_read"] == min(phase["n_rows"], phase_recipe["max_steps"] * phase_recipe["batch_size"])
    steps = [step for step, _ in sft["losses"]]
    assert steps == sorted(steps) and steps[-1] == sum(phase_recipe["max_steps"] for _, phase_recipe in phases)
    # The intermediate checkpoints are not left behind.
    assert [path.name for path in demo_dir.iterdir() if path.name.startswith("sft")] == ["sft"]
    label = ("stage 2: multi-task SFT, then REC only, then VQA only, then position questions only, then color questions"
             " + digit questions + count questions only, then REC only, then all tasks")
    assert f"| {label} |" in (demo_dir / "report.md").read_text()


def test_a_one_phase_focus_recipe_still_reads_as_one_phase(tmp_path):
    from qwenvl.demo import Demo
    from qwenvl.demo_report import stage_label

    demo = Demo(tmp_path, quick=True)
    phase = {"tasks": ["rec"], "max_steps": 4, "batch_size": 4, "learning_rate": 1e-3}
    demo.recipe["sft"]["focus"] = phase
    assert demo.focus_phases() == [(phase, ("rec",))]
    # A record written by the one-phase recipe (its focus a dict) still gets its label.
    record = {"focus": {"tasks": ["rec"]}, "refresh": {}}
    assert stage_label("sft", {"sft": record}) == "stage 2: multi-task SFT, then REC only"
    record["refresh"] = {"train_loss": 0.1}
    assert stage_label("sft", {"sft": record}) == "stage 2: multi-task SFT, then REC only, then all tasks"


def test_a_phase_reads_as_many_rows_as_its_steps_take_drawn_at_random(tmp_path):
    from qwenvl.demo import Demo

    rows = [{"id": i} for i in range(100)]
    demo = Demo(tmp_path, quick=True)
    recipe = {"max_steps": 5, "batch_size": 4}
    taken = demo._rows_for_steps(rows, recipe, "pretrain")
    assert len(taken) == 20 and len({row["id"] for row in taken}) == 20
    assert taken != rows[:20]  # a random draw, not the file's first rows
    assert demo._rows_for_steps(rows, recipe, "pretrain") == taken  # seeded: a rerun reads the same rows
    assert demo._rows_for_steps(rows, recipe, "sft_refresh") != taken
    assert Demo(tmp_path, quick=True, seed=1)._rows_for_steps(rows, recipe, "pretrain") != taken
    assert demo._rows_for_steps(rows, {"max_steps": 30, "batch_size": 4}, "sft") == rows  # fewer rows: all of them


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [*[("attribute_weight", weight, r"recipe vision.attribute_weight must be a number >= 0")
       for weight in (-0.3, "0.3", True, float("nan"))],
     *[("schedule", schedule, r'recipe vision.schedule must be "constant" or "cosine"')
       for schedule in ("linear", "Cosine", None)]],
)
def test_a_bad_vision_recipe_value_is_refused_before_any_stage(tmp_path, key, value, message):
    from qwenvl.demo import Demo

    demo = Demo(tmp_path, quick=True)
    demo.recipe["vision"][key] = value
    with pytest.raises(ValueError, match=message):
        demo.run()
    assert not (tmp_path / "data").exists()


def test_the_vision_stage_warms_up_then_holds_or_decays_its_rate_on_a_cosine():
    from qwenvl.demo import _vision_rate

    steps, peak = 200, 2e-3  # warm-up: the first 10 steps
    assert _vision_rate(1, steps, peak, "constant") == pytest.approx(peak / 10)
    assert _vision_rate(1, steps, peak, "cosine") == pytest.approx(peak / 10)
    assert [_vision_rate(s, steps, peak, "constant") for s in (10, 105, 200)] == [peak] * 3
    cosine = [_vision_rate(s, steps, peak, "cosine") for s in range(10, steps + 1)]
    assert cosine[0] == pytest.approx(peak) and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # falls at every step
    assert _vision_rate(105, steps, peak, "cosine") == pytest.approx(peak / 2)  # halfway through the decay


def test_a_focus_phase_naming_an_unknown_task_is_refused_before_training(tmp_path):
    from qwenvl.demo import Demo

    demo = Demo(tmp_path, quick=True)
    demo.recipe["sft"]["focus"][1]["tasks"] = ["VQA"]
    with pytest.raises(ValueError, match=r"recipe sft.focus\[1\].tasks: unknown task\(s\) \['VQA'\]; expected .*'vqa'"):
        demo.stage_sft()
    demo.recipe["sft"]["focus"][1]["tasks"] = []
    with pytest.raises(ValueError, match=r"recipe sft.focus\[1\].tasks is empty"):
        demo.run()  # before the first stage
    del demo.recipe["sft"]["focus"][0]["learning_rate"]
    with pytest.raises(ValueError, match=r"recipe sft.focus\[0\] lacks \['learning_rate'\]"):
        demo.run()
    demo.recipe["sft"]["focus"][0]["learning_rate"] = 1e-3
    demo.recipe["sft"]["focus"][1]["tasks"] = ["vqa"]
    demo.recipe["data"]["drill"] = []  # the position-drill phase would find no rows
    with pytest.raises(ValueError, match=r"recipe sft.focus\[2\].tasks: no training rows drill \['position'\]: "
                                         r"recipe data.drill is \[\]"):
        demo.run()
    demo.recipe["sft"]["focus"] = []
    with pytest.raises(ValueError, match=r"recipe sft.focus is empty"):
        demo.run()
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "sft_multitask").exists() and not (tmp_path / "sft").exists()


def test_stage_two_trains_in_its_recipes_precision_in_every_phase(demo_dir, tmp_path, monkeypatch):
    import qwenvl.demo as demo_module
    import qwenvl.train

    demo = demo_module.Demo(tmp_path, quick=True)
    for stage in ("data", "pretrain"):
        (tmp_path / stage).symlink_to(demo_dir / stage)
    demo.recipe["sft"].update(bf16=True, compile=True, attn_implementation="eager")  # whatever this machine's speed
    # One step a phase: the phases' settings are under test, not what they learn (bf16 crawls on an AVX2-only CPU).
    for phase in (demo.recipe["sft"], *demo.recipe["sft"]["focus"], demo.recipe["sft"]["refresh"]):
        phase["max_steps"] = 1
    assert demo.precision() == "fp32, stage 2 in bf16 autocast with regional torch.compile with eager attention"
    compiled, autocast = [], []
    monkeypatch.setattr(qwenvl.train, "compile_regions",
                        lambda model: compiled.append((type(model).__name__, model.config._attn_implementation)))
    arguments = demo_module._training_arguments
    monkeypatch.setattr(demo_module, "_training_arguments",
                        lambda *args, **kwargs: autocast.append(args[4]) or arguments(*args, **kwargs))
    record = demo.stage_sft()
    # Multi-task, each focus phase, then every task again.
    phases = 2 + len(demo.recipe["sft"]["focus"])
    assert compiled == [("QwenVLForConditionalGeneration", "eager")] * phases and autocast == [True] * phases
    assert record["metrics"]["rec"]["n"] > 0 and (tmp_path / "sft" / "model.safetensors").exists()
    # The attention choice is the training's, not the checkpoint's: the saved model loads with SDPA.
    assert "attn_implementation" not in (tmp_path / "sft" / "config.json").read_text()


@pytest.mark.parametrize("implementation", ["flash_attention_2", "Eager", 1])
def test_an_unknown_attention_implementation_is_refused_before_any_stage(tmp_path, implementation):
    import qwenvl.demo as demo_module

    demo = demo_module.Demo(tmp_path, quick=True)
    demo.recipe["sft"]["attn_implementation"] = implementation
    with pytest.raises(ValueError, match=r'recipe attn_implementation must be "eager" or "sdpa", got'):
        demo.run()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("speedup", [0.012, 6.5])  # an AVX2-only CPU (no bf16 kernels), an AMX Xeon
def test_stage_two_uses_bf16_where_the_machine_runs_it_faster(tmp_path, monkeypatch, speedup):
    import qwenvl.demo as demo_module
    import qwenvl.train.precision as precision

    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device="cpu": speedup)
    monkeypatch.setattr(demo_module, "bf16_matmul_speedup", precision.bf16_matmul_speedup)
    demo = demo_module.Demo(tmp_path)
    assert json.loads(demo_module.CONFIG_PATH.read_text())["full"]["sft"]["bf16"] == "auto"
    fast = speedup > 1

    assert demo.trains_in_bf16(demo.recipe["sft"]) is fast
    assert demo.trains_in_bf16({**demo.recipe["sft"]["focus"][0], "bf16": "auto"}) is fast
    assert demo.trains_in_bf16(demo.recipe["reward"]) is False  # other stages: fp32 unless --bf16
    expected = "in bf16 autocast with regional torch.compile" if fast else "with regional torch.compile"
    expected += " with eager attention"  # the recipe's: faster than SDPA in compiled blocks on a CPU
    assert demo.precision().startswith(f"fp32, stage 2 {expected} (")
    assert f"bf16 {'used' if fast else 'not used'}: bf16 matmuls run {speedup:.2f}x as fast as fp32" in demo.precision()
    with pytest.raises(ValueError, match="bf16 must be true, false or \"auto\""):
        demo.trains_in_bf16({"bf16": "yes"})


def test_forcing_bf16_on_a_machine_without_fast_bf16_warns(tmp_path, monkeypatch, capsys):
    import qwenvl.demo as demo_module
    import qwenvl.train.precision as precision

    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device="cpu": 0.01)
    demo_module.Demo(tmp_path, bf16=True)
    assert "bf16 matmuls run at 0.01x the speed of fp32 ones" in capsys.readouterr().out


def test_final_checkpoint_is_hub_ready_and_chats(demo_dir, tmp_path):
    from transformers import AutoModel, AutoProcessor

    final = demo_dir / "final"
    assert {"config.json", "modeling_qwenvl.py", "processing_qwenvl.py", "chat_template.jinja",
            "tokenizer.json"} <= {p.name for p in final.iterdir()}
    AutoModel.from_pretrained(final, trust_remote_code=True)
    AutoProcessor.from_pretrained(final, trust_remote_code=True)
    image = demo_dir / "data" / "images" / "test_000000.png"
    out = tmp_path / "drawn.png"
    result = subprocess.run([sys.executable, "-m", "qwenvl.cli", "chat", "--model", str(final), "--image", str(image),
                             "--draw", str(out), "--max-new-tokens", "24", "--trusted-text",
                             "<ref>the red circle</ref>"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.exists() and Image.open(out).size == Image.open(image).size


def test_a_rerun_continues_from_finished_stages(demo_dir):
    start = time.perf_counter()
    records = run_demo(demo_dir, quick=True, seed=0)
    assert time.perf_counter() - start < 60
    assert set(records) == set(STAGES)


def test_image_token_targets_take_the_object_covering_most_of_the_cell():
    from qwenvl.data.synthetic import PATCH_CLASSES
    from qwenvl.demo import _cell_targets

    bg = len(PATCH_CLASSES)
    classes = torch.full((1, 16), bg)  # a 4 x 4 patch grid, 2 x 2 image tokens
    classes[0, [0, 1, 4]] = 7  # three patches of object 7 in the top-left cell
    classes[0, 5] = 9  # and one of object 9
    boxes = torch.zeros(1, 16, 4)
    boxes[0, [0, 1, 4]] = torch.tensor([0.0, 0.0, 0.4, 0.4])
    boxes[0, 5] = torch.tensor([0.2, 0.2, 0.6, 0.6])
    labels, cell_boxes = _cell_targets(classes, boxes, cells=4)
    assert labels.tolist() == [[7, bg, bg, bg]]
    assert cell_boxes[0, 0].tolist() == pytest.approx([0.0, 0.0, 0.4, 0.4]) and not cell_boxes[0, 1:].any()
    with pytest.raises(ValueError, match="do not tile"):
        _cell_targets(classes, boxes, cells=9)


def test_coordinate_digit_targets_are_the_characters_the_box_text_starts_each_coordinate_with():
    from qwenvl.demo import _coordinate_digits
    from qwenvl.grounding import format_box

    box = [28, 34, 52, 111]  # pixels of a 112-px scene
    digits = _coordinate_digits(torch.tensor(box) / 112).tolist()
    written = re.findall(r"\d+", format_box(box, (112, 112)))  # <box>(250,303),(464,991)</box>
    assert digits == [int(c) for value in written for c in value.zfill(3)[:2]]
    assert digits == [2, 5, 3, 0, 4, 6, 9, 9]


def test_attribute_targets_split_every_object_class_into_its_colour_and_its_noun():
    from qwenvl.data.synthetic import COLORS, PATCH_CLASSES, SHAPES
    from qwenvl.demo import _attribute_targets

    colors, nouns = _attribute_targets(torch.arange(len(PATCH_CLASSES)))
    names = list(COLORS)
    noun_names = [*SHAPES, *(f"digit {d}" for d in range(10))]
    assert [f"{names[c]} {noun_names[n]}" for c, n in zip(colors.tolist(), nouns.tolist())] == list(PATCH_CLASSES)
    # "the triangle" is one noun class whatever its colour: what a colour question looks the object up by
    triangles = [i for i, name in enumerate(PATCH_CLASSES) if name.endswith(" triangle")]
    assert len(triangles) == len(COLORS) and len(set(nouns[triangles].tolist())) == 1


def test_bf16_autocast_is_opt_in_from_the_command_line(monkeypatch, tmp_path):
    import qwenvl.demo as demo_module
    from qwenvl.cli import build_parser

    assert build_parser().parse_args(["demo"]).bf16 is False
    assert build_parser().parse_args(["demo", "--bf16"]).bf16 is True
    assert demo_module.Demo(tmp_path).bf16 is False
    assert demo_module.Demo(tmp_path, bf16=True).precision() == "bf16 autocast"
    assert demo_module.Demo(tmp_path, quick=True).precision() == "fp32"
    assert "training in fp32" in demo_module.machine_summary("fp32")

    seen = []

    def fake_run(self):
        seen.append(self.bf16)
        return {}

    monkeypatch.setattr(demo_module.Demo, "run", fake_run)
    args = build_parser().parse_args(["demo", "--bf16", "--out", str(tmp_path / "out")])
    args.func(args)
    assert seen == [True]


def test_the_report_names_the_cpu_model_not_just_the_architecture():
    import qwenvl.demo as demo_module

    summary = demo_module.machine_summary("fp32")
    assert demo_module.cpu_model() in summary and platform.machine() in summary
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        if names:  # x86 Linux; some ARM kernels list no model name
            assert demo_module.cpu_model() == names[0]


def test_the_demo_report_names_how_the_training_data_were_shaped(tmp_path):
    from qwenvl.demo_report import write_report

    for data, expected in (
        ({"vqa_questions": 4, "minimal_rec_share": 0.5},
         "(4 questions per training VQA conversation; 50% of training REC rows name their object by the shortest "
         "unique phrase)"),
        ({"vqa_questions": 4, "minimal_rec_share": 0.0}, "(4 questions per training VQA conversation) |"),
        ({"vqa_questions": 4, "rec_questions": 3},
         "(4 questions per training VQA conversation; up to 3 objects per training REC conversation) |"),
        ({"vqa_questions": 1}, "10 training scenes × 4 tasks |"),
    ):
        write_report({"data": {"n_train_scenes": 10, "seconds": 1.0, **data}}, tmp_path / "report.md",
                     quick=True, machine="test")
        assert expected in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_the_report_gives_ppos_held_out_rewards_with_the_paired_standard_error_and_the_rewards_parts():
    from qwenvl.demo_report import ppo_summary

    ppo = {"reward_sft": -20.0, "reward_ppo": -19.5, "reward_paired_se": 0.25, "task_reward_weight": 0.0}
    assert ppo_summary(ppo) == ("held-out mean reward -20.000 (SFT) → -19.500 (PPO), paired difference +0.500 ± "
                                "0.250 s.e.")
    ppo.update(task_sft=0.75, task_ppo=0.85, task_paired_se=0.02)
    task = "task score (REC: IoU, VQA: exact match) 0.750 (SFT) → 0.850 (PPO), paired difference +0.100 ± 0.020 s.e."
    assert ppo_summary(ppo).endswith(f"0.250 s.e.; {task}")
    ppo.update(task_reward_weight=4.0, reward_model_sft=-23.0, reward_model_ppo=-22.9, reward_model_paired_se=0.1)
    assert ppo_summary(ppo) == (
        "held-out mean reward (the reward model's score + 4 × the task score) -20.000 (SFT) → -19.500 (PPO), paired "
        "difference +0.500 ± 0.250 s.e.; the reward model's score -23.000 (SFT) → -22.900 (PPO), paired difference "
        f"+0.100 ± 0.100 s.e.; {task}")
    assert ppo_summary({}) == "held-out mean reward –"
