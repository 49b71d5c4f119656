"""The demo's outputs: `report.md` (metrics per stage, times, targets), `loss.png` and `grounding.png`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from .data.synthetic import DRILL_TASKS, _join

TARGETS = {"rec": 0.80, "vqa": 0.90, "reward": 0.90}
EVAL_STAGES = (("init", "untrained"), ("pretrain", "stage 1: adapter pre-training"),
               ("sft", "stage 2: multi-task SFT"), ("ppo", "stage 3: PPO-ptx"))
_TASK_NAMES = {"rec": "REC", "vqa": "VQA", "grounded_caption": "grounded captions", "caption": "captions",
               **{task: f"{qtype} questions" for task, qtype in DRILL_TASKS.items()}}


def stage_label(stage: str, records: dict) -> str:
    """A stage's row label; stage 2 names its focus phases' tasks and its refresh phase when it had them
    (`Demo.stage_sft`; a record of the one-phase recipe holds one focus phase, not a list)."""
    label = dict(EVAL_STAGES)[stage]
    record = records.get(stage, {}) if stage == "sft" else {}
    focus = record.get("focus") or []
    for phase in [focus] if isinstance(focus, dict) else focus:
        label += ", then " + " + ".join(_TASK_NAMES.get(task, task) for task in phase["tasks"]) + " only"
    if record.get("refresh"):
        label += ", then all tasks"
    return label


def _metric(metrics: dict, task: str, key: str) -> float | None:
    value = metrics.get(task, {}).get(key)
    return None if value is None else float(value)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def plot_losses(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(records.get("vision", {}).get("losses"), "ViT pre-training (dense patch targets)", "loss"),
              (records.get("pretrain", {}).get("losses"), "stage 1: adapter pre-training", "loss"),
              (records.get("sft", {}).get("losses"), stage_label("sft", records), "loss"),
              (records.get("reward", {}).get("losses"), "reward model (pairwise)", "loss")]
    history = records.get("ppo", {}).get("history") or []
    figure, axes = plt.subplots(1, 5, figsize=(22, 3.6))
    for axis, (points, title, label) in zip(axes, panels):
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, color="#4e79a7")
        axis.set_title(textwrap.fill(title, 48), fontsize=10)  # stage 2's label names each of its phases
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axis = axes[4]
    if history:
        updates = [h.get("update", i + 1) for i, h in enumerate(history)]
        for key, color in (("objective/scores", "#59a14f"), ("objective/kl", "#e15759"), ("loss/ptx_avg", "#f28e2b")):
            if key in history[0]:
                axis.plot(updates, [h[key] for h in history], color=color, label=key)
        axis.legend(fontsize=7)
    axis.set_title("stage 3: PPO-ptx", fontsize=10)
    axis.set_xlabel("update")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_grounding(data_dir: Path, model_dir: Path, path: Path, n: int = 8, scale: int = 3) -> None:
    """Test images with the true box (green) and the final model's box (red), from its saved predictions."""
    from .eval import load_jsonl
    from .grounding import parse_boxes

    predictions = json.loads((model_dir / "predictions.json").read_text()) if (model_dir / "predictions.json").exists() \
        else {}
    rows = [r for r in load_jsonl(data_dir / "test_samples.jsonl") if r["task"] == "rec" and r["id"] in predictions]
    rows = rows[:n]
    tiles = []
    for row in rows:
        image = Image.open(data_dir / row["image"]).convert("RGB")
        width, height = image.size
        image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        draw.rectangle([v * scale for v in row["box"]], outline=(0, 170, 0), width=3)
        predicted = parse_boxes(predictions[row["id"]], (width, height))
        if predicted:
            draw.rectangle([v * scale for v in predicted[0][1]], outline=(220, 0, 0), width=2)
        label = row["prompt"].replace("<ref>", "").replace("</ref>", "")
        caption = Image.new("RGB", (image.width, 18), "white")
        ImageDraw.Draw(caption).text((3, 3), label[:40], fill="black")
        tile = Image.new("RGB", (image.width, image.height + 18), "white")
        tile.paste(image, (0, 0))
        tile.paste(caption, (0, image.height))
        tiles.append(tile)
    if not tiles:
        tiles = [Image.new("RGB", (200, 60), "white")]
        ImageDraw.Draw(tiles[0]).text((5, 20), "no grounding predictions", fill="black")
    columns = min(4, len(tiles))
    rows_n = (len(tiles) + columns - 1) // columns
    w, h = tiles[0].size
    sheet = Image.new("RGB", (columns * (w + 6), rows_n * (h + 6)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (w + 6), (i // columns) * (h + 6)))
    sheet.save(path)


def stage_table(records: dict) -> list[dict]:
    table = []
    for stage, _ in EVAL_STAGES:
        metrics = records.get(stage, {}).get("metrics") or {}
        table.append({
            "stage": stage_label(stage, records),
            "rec": _metric(metrics, "rec", "accuracy"),
            "vqa": _metric(metrics, "vqa", "accuracy"),
            "cider": _metric(metrics, "caption", "cider_d"),
            "grounded_cider": _metric(metrics, "grounded_caption", "cider_d"),
            "nll": _metric(metrics, "answer_nll", "mean"),
            "seconds": records.get(stage, {}).get("seconds"),
        })
    return table


def ppo_summary(ppo: dict) -> str:
    """The held-out rewards of SFT's and PPO's greedy answers, with the paired difference's standard error (one
    draw of 100 prompts moves the mean by about that much), the task score, and the reward model's part of the reward
    when PPO adds the task score to it."""

    def change(key: str) -> str:
        before, after, se = ppo.get(f"{key}_sft"), ppo.get(f"{key}_ppo"), ppo.get(f"{key}_paired_se")
        if before is None or after is None:
            return "–"
        paired = "" if se is None else f", paired difference {after - before:+.3f} ± {se:.3f} s.e."
        return f"{_fmt(before)} (SFT) → {_fmt(after)} (PPO){paired}"

    weight = ppo.get("task_reward_weight")
    if not weight:
        summary = f"held-out mean reward {change('reward')}"
    else:
        summary = (f"held-out mean reward (the reward model's score + {weight:g} × the task score) {change('reward')}; "
                   f"the reward model's score {change('reward_model')}")
    if ppo.get("task_sft") is not None:
        summary += f"; task score (REC: IoU, VQA: exact match) {change('task')}"
    return summary


def write_report(records: dict, path: Path, quick: bool, machine: str) -> None:
    table = stage_table(records)
    reward = records.get("reward", {})
    vision = records.get("vision", {})
    ppo = records.get("ppo", {})
    data = records.get("data", {})
    pairwise = _metric(reward.get("metrics") or {}, "reward", "accuracy")
    untrained_pairwise = _metric(reward.get("metrics_before_training") or {}, "reward", "accuracy")
    before_training = ("" if untrained_pairwise is None else
                       f" (the SFT model's likelihood before this stage's training: {_fmt(untrained_pairwise)})")
    total = sum(r.get("seconds", 0.0) for r in records.values())
    n_eval = ((records.get("sft", {}).get("metrics") or {}).get("rec") or {}).get("n")
    lines = [
        f"# qwenvl demo report{' (--quick: reduced size, numbers are not meaningful)' if quick else ''}",
        "",
        f"Machine: {machine}. Total time: {total / 60:.1f} min.",
        "",
        "| stage | REC Acc@0.5 | VQA acc | caption CIDEr-D | grounded caption CIDEr-D | answer NLL | stage time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(f"| {row['stage']} | {_fmt(row['rec'])} | {_fmt(row['vqa'])} | {_fmt(row['cider'])} | "
                     f"{_fmt(row['grounded_cider'])} | {_fmt(row['nll'])} | {_fmt(row['seconds'], 0)} |")
    token_reads = vision.get("token_digit_accuracy")
    token_reads = "" if token_reads is None else f", coordinate digits from image tokens {_fmt(token_reads)}"
    if vision.get("token_noun_accuracy") is not None:
        token_reads += (f", colour {_fmt(vision.get('token_color_accuracy'))} and noun "
                        f"{_fmt(vision['token_noun_accuracy'])} from image tokens")
    n_questions = data.get("vqa_questions", 1)
    n_referrals = data.get("rec_questions", 1)
    minimal_share = data.get("minimal_rec_share", 0.0)
    shaping = [f"{n_questions} questions per training VQA conversation"] if n_questions > 1 else []
    if n_referrals > 1:
        shaping.append(f"up to {n_referrals} objects per training REC conversation")
    if minimal_share > 0:
        shaping.append(f"{minimal_share:.0%} of training REC rows name their object by the shortest unique phrase")
    drills = [f"{qtype} questions only" for qtype in data.get("drill", [])]
    if drills:
        kinds = _join([drills[0], *(f"one of {kind}" for kind in drills[1:])])
        shaping.append(f"a conversation of {kinds} per training scene that has them")
    shaping_note = f" ({'; '.join(shaping)})" if shaping else ""
    lines += [
        "",
        f"Test split, {n_eval if n_eval is not None else '?'} samples per task for REC (Acc@0.5: first box parsed, "
        "unparseable = miss, coordinates decoded with `parse_boxes`' default scale 1000); VQA: normalised exact "
        "match; answer NLL: mean per-token cross-entropy of the reference answers under teacher forcing.",
        "",
        "| other stage | result | time (s) |",
        "|---|---|---|",
        f"| data + tokenizer | {data.get('n_train_scenes', '?')} training scenes × 4 tasks"
        f"{shaping_note} | "
        f"{_fmt(data.get('seconds'), 0)} |",
        f"| vision pre-training | object class from patches {_fmt(vision.get('object_patch_accuracy'))}, from image "
        f"tokens {_fmt(vision.get('object_token_accuracy'))}, box error "
        f"{_fmt(vision.get('box_error'))} of the image side{token_reads} (test scenes) | "
        f"{_fmt(vision.get('seconds'), 0)} |",
        f"| reward model | held-out pairwise accuracy {_fmt(pairwise)}{before_training} | "
        f"{_fmt(reward.get('seconds'), 0)} |",
        f"| PPO-ptx | {ppo_summary(ppo)} | {_fmt(ppo.get('seconds'), 0)} |",
        "",
        "## Targets",
        "",
    ]
    sft = table[2]
    final = table[3]
    checks = [
        ("REC Acc@0.5 ≥ 0.80 after stage 2", sft["rec"] is not None and sft["rec"] >= TARGETS["rec"]),
        ("VQA accuracy ≥ 0.90 after stage 2", sft["vqa"] is not None and sft["vqa"] >= TARGETS["vqa"]),
        ("reward-model pairwise accuracy ≥ 0.90", pairwise is not None and pairwise >= TARGETS["reward"]),
        ("PPO raises the held-out mean reward over SFT",
         ppo.get("reward_ppo") is not None and ppo["reward_ppo"] > ppo["reward_sft"]),
        ("REC Acc@0.5 drops by at most 2 points after PPO",
         sft["rec"] is not None and final["rec"] is not None and final["rec"] >= sft["rec"] - 0.02),
        ("whole demo ≤ 20 minutes", total <= 20 * 60),
    ]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in checks]
    lines += ["", "Pictures: `loss.png` (training curves), `grounding.png` (green: truth, red: final model).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
