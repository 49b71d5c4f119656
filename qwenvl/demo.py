"""`qwenvl demo`: the whole mission on one CPU, with no downloads.

data → tokenizer → vision pre-training → stage 1 (adapter only) → stage 2 (multi-task SFT) → reward model →
PPO-ptx → evaluation after every stage, written to an output folder as `report.md`, `loss.png`, `grounding.png` and a
hub-ready final checkpoint.
Each finished stage leaves `<stage>/done.json`; a re-run continues after the last finished stage.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .train.precision import bf16_matmul_speedup, resolve_bf16, slow_bf16_warning

CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "demo.json"
STAGES = ("data", "init", "vision", "pretrain", "sft", "reward", "ppo")


@dataclass
class DemoPaths:
    root: Path

    def __getattr__(self, name: str) -> Path:  # out/data, out/pretrain, ...
        return self.root / name

    @property
    def final(self) -> Path:
        return self.root / "final"


def _log(message: str) -> None:
    print(f"[qwenvl demo] {message}", flush=True)


def _done(folder: Path) -> dict | None:
    marker = folder / "done.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _finish(folder: Path, record: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "done.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, folder / "done.json")
    return record


def _standard_error(values: list[float]) -> float:
    """Standard error of the mean of `values` (of paired differences: PPO's answer's reward minus SFT's)."""
    if len(values) < 2:
        return float("nan")
    return statistics.stdev(values) / math.sqrt(len(values))


def _read_jsonl(path: Path) -> list[dict]:
    from .eval import load_jsonl

    return load_jsonl(path)


def _training_arguments(folder: Path, recipe: dict, seed: int, device: str, bf16: bool, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(folder / "trainer"),
        max_steps=recipe["max_steps"],
        per_device_train_batch_size=recipe["batch_size"],
        learning_rate=recipe["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=max(1, recipe["max_steps"] // 50),
        save_strategy="no",
        report_to=[],
        bf16=bf16,
        use_cpu=device == "cpu",
        seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **extra,
    )


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count), at most 8."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, count))


def _sft_rows(data_dir: Path, split: str) -> list[dict]:
    """Rows `{images: [path], messages: [...]}` read through the original finetune JSON (the format users bring)."""
    from .data.official import load_official_finetune_json

    return load_official_finetune_json(data_dir / f"{split}.json", data_dir)


def _cell_targets(classes: torch.Tensor, boxes: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image token: the class (and box) covering most patches of its grid cell, else background.

    `classes` (n, grid²) and `boxes` (n, grid², 4) are `patch_targets` stacked; `cells` is the number of image
    tokens (a square grid that divides the patch grid, as `localize_adapter` lays the queries out).
    """
    n, patches = classes.shape
    grid, side = round(patches**0.5), round(cells**0.5)
    if grid * grid != patches or side * side != cells or grid % side:
        raise ValueError(f"{cells} image tokens do not tile a {grid}x{grid} patch grid")
    from .data.synthetic import PATCH_CLASSES

    background = len(PATCH_CLASSES)
    f = grid // side
    per_cell = classes.reshape(n, side, f, side, f).permute(0, 1, 3, 2, 4).reshape(n, cells, f * f)
    cell_boxes = boxes.reshape(n, side, f, side, f, 4).permute(0, 1, 3, 2, 4, 5).reshape(n, cells, f * f, 4)
    votes = torch.zeros(n, cells, background + 1, dtype=torch.int32, device=classes.device)  # (n, cells, classes + bg)
    votes.scatter_add_(2, per_cell, torch.ones_like(per_cell, dtype=torch.int32))
    votes = votes[..., :background]  # a one-hot of every patch would be 390 MB for the 10k training scenes
    covered = votes.amax(-1) > 0
    label = torch.where(covered, votes.argmax(-1), torch.full_like(per_cell[..., 0], background))
    first = (per_cell == label.unsqueeze(-1)).int().argmax(-1)  # a patch of the winning object: its box
    box = torch.gather(cell_boxes, 2, first[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    return label, box * covered.unsqueeze(-1)


COORDINATE_DIGITS = 8  # the hundreds and tens digits of x1, y1, x2, y2 as `<box>` writes them


def _coordinate_digits(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes as fractions of the image side -> (..., 8) digits: the hundreds and tens of each coordinate
    normalised to [0, 1000) as `qwenvl.grounding` encodes it, the characters the LLM writes for an IoU >= 0.5 box."""
    normalised = (boxes * 1000).floor().clamp(0, 999).long()
    return torch.stack((normalised // 100, normalised // 10 % 10), dim=-1).flatten(-2)


def _attribute_targets(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`PATCH_CLASSES` indices -> (colour index, noun index): the two words an object is asked about by, each a
    class of its own, so a noun's class pools the examples of all five colours."""
    from .data.synthetic import COLORS, PATCH_CLASSES

    nouns = len(PATCH_CLASSES) // len(COLORS)
    return classes // nouns, classes % nouns


def _vision_rate(step: int, steps: int, peak: float, schedule: str) -> float:
    """The vision stage's learning rate at `step` (1-based): a linear warm-up over the first 5 % of the steps, then
    `peak` ("constant") or a cosine from `peak` down to 0 at the last step ("cosine")."""
    warmup = max(1, steps // 20)
    rate = peak * min(1.0, step / warmup)
    if schedule == "cosine":
        rate *= 0.5 * (1 + math.cos(math.pi * max(0, step - warmup) / max(1, steps - warmup)))
    return rate


def _chat_texts(rows: list[dict]) -> list[str]:
    """The rows as the model reads them (chat template included), so the template's words get merges too: trained
    on the bare prompts and answers, the vocabulary split "system", "assistant" and the default system prompt into
    single characters, and 44 of a VQA sample's 85 tokens were template."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from .tokenization_qwenvl import load_default_chat_template

    rendered, _ = render_jinja_template(conversations=[row["messages"] for row in rows],
                                        chat_template=load_default_chat_template(), trusted_text=True)
    return rendered


def _phase_summary(record: dict) -> dict:
    """What stage 2's record keeps of a later phase's record."""
    return {key: record[key] for key in ("train_loss", "n_rows", "n_rows_read")}


def _losses(log_history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]


class Demo:
    """Runs the stages in order, skipping finished ones. `quick=True` is the reduced size CI runs."""

    def __init__(self, out: str | os.PathLike, quick: bool = False, seed: int = 0, device: str = "cpu",
                 bf16: bool = False):
        spec = json.loads(CONFIG_PATH.read_text())
        self.model_spec = spec["model"]
        self.recipe = spec["quick" if quick else "full"]
        self.quick = quick
        self.seed = seed
        self.device = device
        # bf16=True: every stage under bf16 autocast. Otherwise stage 2's recipe decides (`bf16`, `compile`), the only
        # stage whose steps run faster that way (docs/findings.md); the vision stage's run slower in bf16.
        self.bf16 = bool(bf16)
        warning = slow_bf16_warning(device) if self.bf16 else None
        if warning:
            _log(f"warning: --bf16: {warning}")
        self.paths = DemoPaths(Path(out))
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self._train_file: tuple[list[dict], dict[str, str]] | None = None  # train.json's rows, each row's task
        self._train_rows: dict[tuple[str, ...], list[dict]] = {}  # the rows of each set of tasks asked for

    # ---------------------------------------------------------------------------------------------------------
    # Stages
    # ---------------------------------------------------------------------------------------------------------

    def stage_data(self) -> dict:
        from .data.synthetic import generate_dataset

        data = self.recipe["data"]
        generate_dataset(self.paths.data, data["n_train"], data["n_val"], data["n_test"], image_size=data["canvas"],
                         seed=self.seed, vqa_questions=data["vqa_questions"], rec_questions=data["rec_questions"],
                         minimal_rec_share=data["minimal_rec_share"], workers=_usable_cpus(),
                         drill=data.get("drill", ()))
        return {"n_train_scenes": data["n_train"], "n_test_scenes": data["n_test"],
                "vqa_questions": data["vqa_questions"], "rec_questions": data["rec_questions"],
                "minimal_rec_share": data["minimal_rec_share"], "drill": list(data.get("drill", ()))}

    def stage_init(self) -> dict:
        from . import QwenVLConfig, QwenVLForConditionalGeneration
        from .testing import processor_for_config
        from .tokenization_qwenvl import train_tokenizer
        from .train import localize_adapter

        tokenizer = train_tokenizer(_chat_texts(self.train_rows()),
                                    vocab_size=self.recipe["tokenizer_vocab_size"])
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        spec = json.loads(json.dumps(self.model_spec))
        spec["visual"]["image_start_id"] = tokenizer.convert_tokens_to_ids("<img>")
        config = QwenVLConfig(vocab_size=len(tokenizer), pad_token_id=eos, eos_token_id=eos, **spec)
        torch.manual_seed(self.seed)
        model = QwenVLForConditionalGeneration(config)
        localize_adapter(model)  # queries start on their own grid cell: image tokens differ from the first step
        model.generation_config.eos_token_id = [eos, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        model.generation_config.pad_token_id = eos
        processor = processor_for_config(tokenizer, config)
        model.save_pretrained(self.paths.init)
        processor.save_pretrained(self.paths.init)
        return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
                "metrics": self.evaluate(self.paths.init)}

    def _patch_batches(self, split: str, processor, limit: int | None = None):
        """Pixel values and dense patch targets (`qwenvl.data.synthetic.patch_targets`) of a split's scenes, on
        `--device` (10k 64-px scenes: ~0.5 GB of pixels)."""
        import numpy as np

        from .data.synthetic import patch_targets
        from .eval.runner import _load_images

        source = self.paths.data / f"{split}_scenes.jsonl"
        rows = _read_jsonl(source)[:limit]
        vision = self.model_spec["visual"]
        grid = vision["image_size"] // vision["patch_size"]
        pixels, classes, boxes = [], [], []
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            images = _load_images(chunk, self.paths.data, str(source), range(start, start + len(chunk)))
            pixels.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
            for row in chunk:
                patch_classes, patch_boxes = patch_targets(row, grid)
                classes.append(patch_classes)
                boxes.append(patch_boxes)
        return tuple(t.to(self.device) for t in (torch.cat(pixels), torch.from_numpy(np.stack(classes)),
                                                  torch.from_numpy(np.stack(boxes))))

    def stage_vision(self) -> dict:
        """Pre-train the vision tower from scratch on dense targets: what (colour, shape or digit) is where.

        The release starts stage 1 from a pre-trained OpenCLIP ViT; nothing can be downloaded here, so the demo
        pre-trains its own. Every patch predicts the object under its centre and that object's box in image
        coordinates; every image token (the adapter's output, what the LLM reads) predicts the same for the object
        covering most of its grid cell. Both heads are linear and thrown away afterwards. The token targets matter:
        trained on patches only, the object class was linearly decodable from 80 % of a cell's patches but from 71 %
        of its image token before stage 2 and 13 % after it (docs/findings.md). With the recipe's
        `coordinate_digits` the heads also classify the hundreds and tens digit of each box coordinate, the characters
        `<box>` writes: the LLM then copies digits it can read off linearly instead of turning a regressed coordinate
        into digits, and an image token that mixes two objects still votes for whole digits (REC 0.58 -> 0.71, answer
        NLL 0.41 -> 0.34, run 20 against run 19). With `attribute_weight` > 0 they also classify the object's colour
        and its noun (shape or digit) on their own, weighted so: pooled over colours, each handwritten digit gets five
        times the examples of its joint class (digit questions 0.49 -> 0.85 on 600 test scenes, run 24 against run
        25), at some cost in coordinate digits (0.76 -> 0.69) and REC (0.69 -> 0.61). The recipe's `schedule`
        "cosine" decays the rate to 0 after the warm-up: 6000 such steps against 3000 at a constant rate read the
        image tokens' coordinate digits 0.69 -> 0.86 and nouns 0.92 -> 0.96, and after stage 2 took digit questions
        0.70 -> 0.84 on 600 test scenes (run 39 against run 38). The position table starts as a 2-D sin-cos grid so
        positions are smooth from the first step. The LLM stays as initialised.
        """
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM

        from .data.synthetic import COLORS, PATCH_CLASSES
        from .modeling_qwenvl import get_2d_sincos_pos_embed

        recipe = self.recipe["vision"]
        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_pretrained(self.paths.init, trust_remote_code=True, dtype=torch.float32)
        processor = self.processor(self.paths.init)
        vit = model.transformer.visual
        table = vit.positional_embedding
        with torch.no_grad():
            side = int(table.shape[0] ** 0.5)
            table.copy_(torch.from_numpy(get_2d_sincos_pos_embed(table.shape[1], side)))
        pixels, classes, boxes = self._patch_batches("train", processor)
        test_pixels, test_classes, test_boxes = self._patch_batches("test", processor, limit=200)
        cells = vit.attn_pool.query.shape[0]
        token_classes, token_boxes = _cell_targets(classes, boxes, cells)
        test_token_classes, test_token_boxes = _cell_targets(test_classes, test_boxes, cells)
        background = len(PATCH_CLASSES)
        digits = recipe.get("coordinate_digits", False)
        attribute_weight = self.attribute_weight()
        attributes = attribute_weight > 0
        n_colors = len(COLORS)
        n_nouns = background // n_colors
        outputs = (background + 1 + 4 + (COORDINATE_DIGITS * 10 if digits else 0)
                   + (n_colors + n_nouns if attributes else 0))
        patch_head = torch.nn.Linear(table.shape[1], outputs)
        token_head = torch.nn.Linear(vit.proj.shape[1], outputs)
        device = torch.device(self.device)  # where `_patch_batches` put the scenes and targets
        for module in (vit, patch_head, token_head):
            module.to(device)
        vit.attn_pool.pos_embed.requires_grad_(False)  # the adapter's fixed sin-cos table never trains
        tower = [p for p in vit.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(tower + list(patch_head.parameters()) + list(token_head.parameters()),
                                      lr=recipe["learning_rate"], betas=(0.9, 0.98))
        generator = torch.Generator().manual_seed(self.seed)

        def split(out):
            """A head's output: class logits, box, (with `coordinate_digits`) ten logits per coordinate digit and (with
            `attribute_weight`) colour and noun logits."""
            start = background + 5
            digit_logits = out[..., start : start + COORDINATE_DIGITS * 10].unflatten(-1, (COORDINATE_DIGITS, 10)) \
                if digits else None
            start += COORDINATE_DIGITS * 10 if digits else 0
            attribute_logits = (out[..., start : start + n_colors], out[..., start + n_colors :]) if attributes else None
            return out[..., : background + 1], out[..., background + 1 : background + 5], digit_logits, attribute_logits

        def loss_of(out, target_classes, target_boxes):
            on_object = target_classes != background
            class_logits, box, digit_logits, attribute_logits = split(out)
            class_loss = F.cross_entropy(class_logits.flatten(0, 1), target_classes.flatten())
            loss = class_loss + 4.0 * F.l1_loss(box[on_object], target_boxes[on_object])
            if digits:
                wanted = _coordinate_digits(target_boxes[on_object])
                loss = loss + F.cross_entropy(digit_logits[on_object].flatten(0, 1), wanted.flatten())
            if attributes:
                for logits, wanted in zip(attribute_logits, _attribute_targets(target_classes[on_object])):
                    loss = loss + attribute_weight * F.cross_entropy(logits[on_object], wanted)
            return loss

        losses = []
        steps, schedule = recipe["max_steps"], self.vision_schedule()
        for step in range(1, steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = _vision_rate(step, steps, recipe["learning_rate"], schedule)
            index = torch.randint(0, len(pixels), (recipe["batch_size"],), generator=generator).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                patches = vit.encode_patches(pixels[index])
                loss = loss_of(patch_head(patches), classes[index], boxes[index]) + loss_of(
                    token_head(vit.pool_patches(patches)), token_classes[index], token_boxes[index]
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % max(1, steps // 50) == 0:
                losses.append((step, loss.item()))
        with torch.no_grad():
            patches = vit.encode_patches(test_pixels)
            patch_out, token_out = patch_head(patches), token_head(vit.pool_patches(patches))

        def accuracy(out, target_classes):
            on_object = target_classes != background
            return float((split(out)[0].argmax(-1)[on_object] == target_classes[on_object]).float().mean())

        on_object = test_classes != background
        box_error = (split(patch_out)[1][on_object] - test_boxes[on_object]).abs().mean()
        record = {"losses": losses, "object_patch_accuracy": accuracy(patch_out, test_classes),
                  "object_token_accuracy": accuracy(token_out, test_token_classes), "box_error": float(box_error),
                  "n_scenes": len(pixels)}
        on_token_object = test_token_classes != background
        if digits:
            predicted = split(token_out)[2][on_token_object].argmax(-1)
            wanted = _coordinate_digits(test_token_boxes[on_token_object])
            record["token_digit_accuracy"] = float((predicted == wanted).float().mean())
        if attributes:
            wanted = _attribute_targets(test_token_classes[on_token_object])
            for name, logits, target in zip(("color", "noun"), split(token_out)[3], wanted):
                record[f"token_{name}_accuracy"] = float((logits[on_token_object].argmax(-1) == target).float().mean())
        model.to("cpu").save_pretrained(self.paths.vision)
        processor.save_pretrained(self.paths.vision)
        return record

    def _train_sft(self, source: Path, folder: Path, stage: str, recipe: dict, tasks: tuple[str, ...] | None,
                   evaluate: bool = True, collator=None) -> dict:
        """One training phase; `collator`: one shared by the phases of a stage, so each row is encoded once."""
        from transformers import AutoModelForCausalLM

        from .train import QwenVLDataCollator, QwenVLTrainer, apply_stage, compile_regions

        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=torch.float32,
                                                     **self.attention(recipe))
        processor = self.processor(source)
        table = apply_stage(model, stage, verbose=True)
        if recipe.get("compile", False):
            compile_regions(model)  # in place: the saved checkpoint's names and weights are unchanged
        available = self.train_rows(tasks)
        rows = self._rows_for_steps(available, recipe, folder.name)
        trainer = QwenVLTrainer(
            model=model,
            # Tasks differ 3x in length: batches of like lengths instead of mostly padding (2x faster steps here).
            args=_training_arguments(folder, recipe, self.seed, self.device, self.trains_in_bf16(recipe),
                                     train_sampling_strategy="group_by_length"),
            train_dataset=rows,
            data_collator=collator or QwenVLDataCollator(processor, cache_encodings=True),
            processing_class=processor,
            model_card={"stage": stage, "table": table},
        )
        result = trainer.train()
        trainer.save_model(str(folder))
        processor.save_pretrained(folder)
        record = {"train_loss": result.training_loss, "losses": _losses(trainer.state.log_history),
                  "n_rows": len(available), "n_rows_read": len(rows)}
        return {**record, "metrics": self.evaluate(folder)} if evaluate else record

    def train_rows(self, tasks: tuple[str, ...] | None = None) -> list[dict]:
        """The training split's rows of `tasks` (default: the evaluated tasks, not the drills). The finetune JSON and
        the samples file that names each row's task are read once per run: five stages ask for rows, stage 2 five
        times, and reading them takes ~3.5 s and ~1 s."""
        from .data.synthetic import TASKS

        key = TASKS if tasks is None else tuple(tasks)
        if key not in self._train_rows:
            if self._train_file is None:
                task_of = {row["id"]: row["task"] for row in _read_jsonl(self.paths.data / "train_samples.jsonl")}
                self._train_file = (_sft_rows(self.paths.data, "train"), task_of)
            rows, task_of = self._train_file
            self._train_rows[key] = [row for row in rows if task_of[row["id"]] in key]
        return self._train_rows[key]

    def _rows_for_steps(self, rows: list[dict], recipe: dict, phase: str) -> list[dict]:
        """As many rows as a phase's steps read (`max_steps` x `batch_size`), drawn at random (seeded by the run's seed
        and the phase) where the split holds more; else all of them. The steps see rows of the same distribution, and
        length grouping, which encodes every row it is given before the first step (~1 ms a row), no longer encodes
        10,000 captions for stage 1's 960 or 40,000 rows for the refresh's 6,400."""
        wanted = recipe["max_steps"] * recipe["batch_size"]
        if len(rows) <= wanted:
            return rows
        return random.Random(f"{self.seed}/{phase}").sample(rows, wanted)

    def stage_pretrain(self) -> dict:
        return self._train_sft(self.paths.vision, self.paths.pretrain, "pretrain", self.recipe["pretrain"],
                               tasks=("caption",))

    def stage_sft(self) -> dict:
        """Multi-task SFT, then phases on the recipe's `focus` tasks only (REC, VQA, position questions, colour, digit
        and count questions, REC again), then a short `refresh` on every task.

        The ViT was pre-trained in its own stage (as the release's OpenCLIP ViT was) and is kept as it is. The tasks
        compete for the small LLM: mixed in, REC stops improving (0.42 with every REC row three times for 4000
        steps), while steps on REC rows alone take it up (0.41 -> 0.51 after 800, 0.66 after 1600) and cost VQA and
        captions; VQA rows alone do the same for questions that mixed training leaves at chance (colour 0.67 -> 0.84,
        position 0.50 -> 0.68 in 300 steps), and rows of position questions alone for those (0.62 -> 0.94); 400 steps
        on every task afterwards bring the rest back and keep the gains (docs/findings.md). The later
        phases' steps continue the step axis of the losses.
        """
        from .train import QwenVLDataCollator

        recipe = self.recipe["sft"]
        focus = self.focus_phases()
        # One collator for every phase, so each row is encoded (~1 ms of template and tokenizer work; the length
        # grouping of each phase encodes every row before its first step) and each image read (~0.7 ms) once.
        collator = QwenVLDataCollator(self.processor(self.paths.pretrain), cache_encodings=True, cache_images=True)
        # Every phase trains the recipe's way.
        precision = {key: recipe[key] for key in ("bf16", "compile", "attn_implementation") if key in recipe}
        # (folder, recipe, tasks) of the phases, each starting from the one before.
        phases = [(self.paths.sft_multitask, recipe, None)]
        # The first focus phase's folder keeps its name of the one-phase recipe: it seeds the phase's draw of rows.
        phases += [(getattr(self.paths, f"sft_focus_{i + 1}" if i else "sft_focus"), {**precision, **phase}, tasks)
                   for i, (phase, tasks) in enumerate(focus)]
        phases += [(self.paths.sft, {**precision, **recipe["refresh"]}, None)]
        # The rows the phases will read, encoded on every core before the first step (16 s instead of 30 here).
        ahead = {row["id"]: row for folder, phase_recipe, phase_tasks in phases
                 for row in self._rows_for_steps(self.train_rows(phase_tasks), phase_recipe, folder.name)}
        collator.encode_ahead(list(ahead.values()), workers=_usable_cpus(), where="train row")
        records, losses = [], []
        source, start = self.paths.pretrain, 0
        for folder, phase_recipe, phase_tasks in phases:
            record = self._train_sft(source, folder, "multitask-frozen-vit", phase_recipe, tasks=phase_tasks,
                                     evaluate=folder == self.paths.sft, collator=collator)
            losses += [(start + step, loss) for step, loss in record["losses"]]
            records.append(record)
            source, start = folder, start + phase_recipe["max_steps"]
        for folder, _, _ in phases[:-1]:
            shutil.rmtree(folder)  # the stage's result is `sft`
        mixed, refreshed = records[0], records[-1]
        return {**mixed, "losses": losses, "metrics": refreshed["metrics"],
                "focus": [{"tasks": list(tasks), **_phase_summary(record)}
                          for (_, tasks), record in zip(focus, records[1:])],
                "refresh": _phase_summary(refreshed)}

    def attribute_weight(self) -> float:
        """The vision stage's `attribute_weight`, checked: `run` calls this before any stage, like `focus_phases`."""
        weight = self.recipe["vision"].get("attribute_weight", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"recipe vision.attribute_weight must be a number >= 0 (0: no colour and noun heads), "
                             f"got {weight!r}")
        return float(weight)

    def vision_schedule(self) -> str:
        """The vision stage's learning-rate `schedule` after its warm-up, checked like `attribute_weight`: "constant"
        (the default) or "cosine" (decayed to 0 by the last step)."""
        schedule = self.recipe["vision"].get("schedule", "constant")
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"recipe vision.schedule must be \"constant\" or \"cosine\", got {schedule!r}")
        return schedule

    def attention(self, recipe: dict) -> dict:
        """`from_pretrained` keywords for stage 2's `attn_implementation` ("eager" or "sdpa"; absent: the model's
        default, SDPA). With compiled blocks on a CPU "eager" is the faster one at the demo's lengths: inductor fuses
        its masked softmax with the matmuls, while the CPU flash kernel's backward is slow for 4 heads of 48 over ~150
        tokens (12.5 against 20.3 ms per layer, forward and backward; a stage-2 step 168 against 203 ms on the AMD Zen 4
        host; docs/findings.md). Checked by `run` before any stage."""
        implementation = recipe.get("attn_implementation")
        if implementation is None:
            return {}
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"recipe attn_implementation must be \"eager\" or \"sdpa\", got {implementation!r}")
        return {"attn_implementation": implementation}

    def focus_phases(self) -> list[tuple[dict, tuple[str, ...]]]:
        """Stage 2's focus phases (recipe `sft.focus`: a list of phases, or one phase) with their tasks, checked:
        `run` calls this before any stage, so a typo costs no training."""
        from .data.synthetic import DRILL_TASKS, TASKS, check_tasks

        focus = self.recipe["sft"]["focus"]
        drill = list(self.recipe["data"].get("drill", ()))
        phases = [focus] if isinstance(focus, dict) else list(focus)
        if not phases:
            raise ValueError("recipe sft.focus is empty: give stage 2 at least one focus phase, e.g. "
                             "[{'tasks': ['rec'], ...}]")
        checked = []
        for i, phase in enumerate(phases):
            where = "recipe sft.focus" if isinstance(focus, dict) else f"recipe sft.focus[{i}]"
            missing = [key for key in ("tasks", "max_steps", "batch_size", "learning_rate") if key not in phase]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
            tasks = tuple(phase["tasks"])
            if not tasks:
                raise ValueError(f"{where}.tasks is empty: name the tasks of this focus phase, e.g. ['rec']")
            check_tasks(tasks, where=f"{where}.tasks", allowed=TASKS + tuple(DRILL_TASKS))
            undrawn = [DRILL_TASKS[task] for task in tasks if task in DRILL_TASKS and DRILL_TASKS[task] not in drill]
            if undrawn:
                raise ValueError(f"{where}.tasks: no training rows drill {undrawn}: recipe data.drill is {drill}")
            checked.append((phase, tasks))
        return checked

    def _preference_rows(self, split: str, limit: int | None = None):
        from datasets import Dataset
        from PIL import Image

        rows = []
        for row in _read_jsonl(self.paths.data / f"{split}_preference.jsonl")[:limit]:
            with Image.open(self.paths.data / row["image"]) as image:
                rows.append({"images": [image.convert("RGB")], "prompt": row["prompt"], "chosen": row["chosen"],
                             "rejected": row["rejected"]})
        return Dataset.from_list(rows)

    def stage_reward(self) -> dict:
        from trl import RewardConfig

        from .eval.runner import evaluate_reward_model
        from .modeling_qwenvl import QwenVLForLikelihoodReward
        from .rl import QwenVLPreferenceCollator, QwenVLRewardTrainer

        recipe = self.recipe["reward"]
        processor = self.processor(self.paths.sft)
        # The SFT model's own likelihood of a reply, sharpened by the pairwise loss: a score head on the last token
        # stayed at chance on these pairs (0.50-0.63 held out after 300-3000 steps at LR 1e-4 to 1e-3;
        # docs/findings.md).
        model = QwenVLForLikelihoodReward.from_pretrained(
            self.paths.sft, dtype=torch.float32, reward_scale=recipe["reward_scale"],
            reply_start_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_start|>"),
        )
        model.config.pad_token_id = processor.tokenizer.pad_token_id
        args = RewardConfig(
            output_dir=str(self.paths.reward / "trainer"), max_steps=recipe["max_steps"],
            per_device_train_batch_size=recipe["batch_size"], learning_rate=recipe["learning_rate"],
            lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=max(1, recipe["max_steps"] // 50),
            save_strategy="no", report_to=[], bf16=self.bf16, use_cpu=self.device == "cpu", seed=self.seed,
            activation_checkpointing=False, remove_unused_columns=False,
        )
        held_out_pairs = self.paths.data / "test_preference.jsonl"
        n_pairs = self.recipe["eval"]["n_pairs"]
        # What the pairwise steps add over the SFT model's own likelihood, which already ranks most pairs
        # (docs/findings.md).
        before = evaluate_reward_model(model.eval(), processor, held_out_pairs, limit=n_pairs)
        collator = QwenVLPreferenceCollator(processor, chat_template_kwargs={"trusted_text": True})
        # The pairs the steps will see, not all 20,000 of the split (each image decoded and stored in an Arrow table).
        pairs = self._preference_rows("train", limit=recipe["max_steps"] * recipe["batch_size"])
        trainer = QwenVLRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=processor,
                                      data_collator=collator)
        result = trainer.train()
        trainer.save_model(str(self.paths.reward))
        processor.save_pretrained(self.paths.reward)
        held_out = evaluate_reward_model(model.eval(), processor, held_out_pairs, limit=n_pairs)
        return {"train_loss": result.training_loss, "losses": _losses(trainer.state.log_history),
                "metrics": held_out["metrics"], "metrics_before_training": before["metrics"]}

    def _ppo_rows(self, split: str, limit: int | None = None) -> list[dict]:
        from PIL import Image

        rows = []
        for row in _read_jsonl(self.paths.data / f"{split}_ppo.jsonl")[:limit]:
            with Image.open(self.paths.data / row["image"]) as image:
                rows.append({"prompt": row["prompt"], "images": [image.convert("RGB")], "box": row["box"],
                             "answer": row["answer"]})
        return rows

    def held_out_rewards(self, policy_dir: Path, rows: list[dict], reward_model: torch.nn.Module
                         ) -> dict[str, list[float]]:
        """Per-prompt scores of a policy's greedy answers to held-out prompts: `reward_model`'s (in eval mode, on
        this demo's device) and the task score (IoU of the first box for REC rows, normalised exact match for VQA
        rows)."""
        from transformers import AutoModelForCausalLM

        from .eval.runner import score_conversations
        from .rl.rewards import exact_match_reward, iou_reward

        policy = AutoModelForCausalLM.from_pretrained(policy_dir, trust_remote_code=True).to(self.device).eval()
        processor = self.processor(policy_dir)
        answers = []
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            responses, _ = policy.batch_chat(processor, [r["prompt"] for r in chunk],
                                             images=[r["images"] for r in chunk], trusted_text=True,
                                             max_new_tokens=self.recipe["ppo"]["response_length"], do_sample=False)
            answers.extend(responses)
        model_scores = [float(s) for s in score_conversations(reward_model, processor, [r["prompt"] for r in rows],
                                                               answers, [r["images"][0] for r in rows])]
        completions = [[{"role": "assistant", "content": a}] for a in answers]
        ious = iou_reward(completions, box=[r["box"] for r in rows], images=[r["images"] for r in rows])
        matches = exact_match_reward(completions, answer=[r["answer"] for r in rows])
        task = [iou if iou is not None else match for iou, match in zip(ious, matches)]
        return {"reward_model": model_scores, "task": task}

    def stage_ppo(self) -> dict:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from .rl import PPOConfig, PPOTrainer
        from .rl.rewards import exact_match_reward, iou_reward
        from .train import QwenVLDataCollator

        recipe = self.recipe["ppo"]
        processor = self.processor(self.paths.sft)
        policy = AutoModelForCausalLM.from_pretrained(self.paths.sft, trust_remote_code=True, dtype=torch.float32)
        reward_model = AutoModelForSequenceClassification.from_pretrained(self.paths.reward, trust_remote_code=True,
                                                                          dtype=torch.float32)
        # Task correctness on top of the reward model: its preference pairs only approximate it (docs/findings.md, PPO).
        task_weight = recipe.get("task_reward_weight", 0.0)
        config = PPOConfig(
            output_dir=str(self.paths.ppo / "trainer"), seed=self.seed, learning_rate=recipe["learning_rate"],
            per_device_train_batch_size=recipe["batch_size"] // recipe["num_mini_batches"],
            gradient_accumulation_steps=1, num_mini_batches=recipe["num_mini_batches"],
            num_ppo_epochs=recipe["num_ppo_epochs"], total_episodes=recipe["total_episodes"],
            response_length=recipe["response_length"], kl_coef=recipe["kl_coef"], ptx_coef=recipe["ptx_coef"],
            normalize_scores=recipe.get("normalize_scores", False), num_generations=recipe.get("num_generations", 1),
            dense_rewards=recipe.get("dense_rewards", False),
            reward_weights=[task_weight, task_weight] if task_weight else None,
            ptx_batch_size=recipe["ptx_batch_size"], mixed_precision="bf16" if self.bf16 else "no",
            chat_template_kwargs={"trusted_text": True}, use_cpu=self.device == "cpu",
        )
        trainer = PPOTrainer(config, processor, policy, reward_model=reward_model,
                             reward_fn=[iou_reward, exact_match_reward] if task_weight else None,
                             # The prompts the episodes need: the split's 20,000 would be decoded for 128 of them.
                             train_dataset=self._ppo_rows("train", recipe["total_episodes"] // config.num_generations),
                             ptx_dataset=self.train_rows(),
                             ptx_collator=QwenVLDataCollator(processor))
        history = trainer.train()
        trainer.save_model(str(self.paths.ppo))
        held_out = self._ppo_rows("test", self.recipe["eval"]["n_prompts"])
        reward_model.to(self.device)  # PPOTrainer froze it (eval, no grad) on its accelerator's device
        sft, ppo = (self.held_out_rewards(folder, held_out, reward_model)
                    for folder in (self.paths.sft, self.paths.ppo))
        for scores in (sft, ppo):  # PPO's reward
            scores["reward"] = [m + task_weight * t for m, t in zip(scores["reward_model"], scores["task"])]
        record = {"history": history, "metrics": self.evaluate(self.paths.ppo), "task_reward_weight": task_weight}
        for key in ("reward", "reward_model", "task"):
            differences = [b - a for a, b in zip(sft[key], ppo[key])]
            record[f"{key}_sft"] = sum(sft[key]) / len(held_out)
            record[f"{key}_ppo"] = sum(ppo[key]) / len(held_out)
            record[f"{key}_paired_se"] = _standard_error(differences)
        return record

    # ---------------------------------------------------------------------------------------------------------
    # Evaluation and outputs
    # ---------------------------------------------------------------------------------------------------------

    def processor(self, folder: Path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def evaluate(self, folder: Path) -> dict:
        from transformers import AutoModelForCausalLM

        from .eval.runner import evaluate_model

        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).to(self.device).eval()
        result = evaluate_model(model, self.processor(folder), self.paths.data / "test_samples.jsonl",
                                batch_size=32, max_new_tokens=self.recipe["eval"]["max_new_tokens"],
                                limit=self.recipe["eval"]["n_samples"])
        (folder / "predictions.json").write_text(json.dumps(result["predictions"], indent=1))
        return result["metrics"]

    def run(self) -> dict:
        self.focus_phases()
        self.attribute_weight()
        self.vision_schedule()
        self.attention(self.recipe["sft"])
        for stage in STAGES:
            folder = getattr(self.paths, stage)
            record = _done(folder)
            if record is not None:
                _log(f"stage {stage}: already done ({record['seconds']:.0f} s), skipping")
            else:
                _log(f"stage {stage}: running")
                start = time.perf_counter()
                record = getattr(self, f"stage_{stage}")()
                record["seconds"] = time.perf_counter() - start
                _finish(folder, record)
                _log(f"stage {stage}: done in {record['seconds']:.0f} s")
            self.records[stage] = record
        self.write_outputs()
        return self.records

    def write_outputs(self) -> None:
        from .demo_report import draw_grounding, plot_losses, write_report

        final = self.paths.final
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(self.paths.ppo, final, ignore=shutil.ignore_patterns("trainer", "done.json"))
        plot_losses(self.records, self.paths.root / "loss.png")
        draw_grounding(self.paths.data, self.paths.final, self.paths.root / "grounding.png")
        write_report(self.records, self.paths.root / "report.md", quick=self.quick,
                     machine=machine_summary(self.precision()))

    def trains_in_bf16(self, recipe: dict) -> bool:
        """`--bf16`, else the stage recipe's `bf16`: true, false, or "auto" (where this device's bf16 matmuls are
        faster than fp32 ones: ~6x on an AMX Xeon, ~70x slower on an AVX2-only CPU; `qwenvl.train.precision`)."""
        return self.bf16 or resolve_bf16(recipe.get("bf16", False), self.device)

    def precision(self) -> str:
        """How the stages train, for the report: fp32 unless `--bf16` or stage 2's recipe says otherwise."""
        if self.bf16:
            return "bf16 autocast"
        recipe = self.recipe["sft"]
        bf16 = self.trains_in_bf16(recipe)
        ways = [way for way, used in (("in bf16 autocast", bf16),
                                      ("with regional torch.compile", recipe.get("compile", False))) if used]
        if recipe.get("attn_implementation"):
            ways.append(f"with {recipe['attn_implementation']} attention")
        summary = "fp32" + (f", stage 2 {' '.join(ways)}" if ways else "")
        if recipe.get("bf16") == "auto":
            summary += (f" (bf16 {'used' if bf16 else 'not used'}: bf16 matmuls run "
                        f"{bf16_matmul_speedup(self.device):.2f}x as fast as fp32 here)")
        return summary


def cpu_model() -> str:
    """The CPU's model name (Linux `/proc/cpuinfo`), else the architecture: hosts of one architecture differ a lot (an
    AMX Xeon runs bf16 matmuls ~6x faster than an AMD Zen 4 of the same core count)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary(precision: str) -> str:
    return (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}; training in {precision}")


def run_demo(out: str | os.PathLike = "demo_out", quick: bool = False, seed: int = 0, device: str = "cpu",
             bf16: bool = False) -> dict:
    return Demo(out, quick=quick, seed=seed, device=device, bf16=bf16).run()
