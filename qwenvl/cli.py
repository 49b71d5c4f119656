"""`qwenvl` console command."""

from __future__ import annotations

import argparse
import os
import sys


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert_official_checkpoint

    try:
        out = convert_official_checkpoint(args.src, args.dst, max_shard_size=args.max_shard_size)
    except ConversionError as err:
        print(f"qwenvl convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _load_for_inference(model_dir: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch_dtype).to(device)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model.eval(), processor


def _chat(args: argparse.Namespace) -> int:
    import torch

    from .grounding import draw_boxes
    from .inference import ImageFileError, load_image_file, response_boxes

    try:
        images = [load_image_file(path) for path in args.image]
    except ImageFileError as err:
        print(f"qwenvl chat: error: {err}", file=sys.stderr)
        return 2
    if args.draw and not images:
        print("qwenvl chat: error: --draw needs an --image to draw on", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        print(f"qwenvl chat: error: model folder not found: {args.model}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, processor = _load_for_inference(args.model, args.device, args.dtype)
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        generate_kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        generate_kwargs.update(temperature=None, top_p=None, top_k=None)

    def draw(response: str) -> None:
        if args.draw:
            n_boxes = len(response_boxes(response, images[-1]))
            draw_boxes(images[-1], response).save(args.draw)
            print(f"[{n_boxes} box(es) drawn to {args.draw}]", file=sys.stderr)

    if args.question:
        response, _ = model.chat(processor, " ".join(args.question), images=images, system=args.system,
                                 trusted_text=args.trusted_text, **generate_kwargs)
        print(response)
        draw(response)
        return 0

    print("Interactive chat. Empty line or :q to quit, :clear to start over.", file=sys.stderr)
    history, pending_images = None, images
    while True:
        try:
            query = input("User: ").strip()
        except EOFError:
            break
        if query in ("", ":q", ":quit"):
            break
        if query == ":clear":
            history, pending_images = None, images
            continue
        print("Assistant: ", end="", flush=True)
        stream = model.chat(processor, query, images=pending_images, history=history, system=args.system,
                            stream=True, trusted_text=args.trusted_text, **generate_kwargs)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        history, pending_images = stream.history, None
        draw(stream.response)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .eval.report import write_report
    from .eval.runner import evaluate_model, evaluate_reward_model

    if not os.path.isfile(args.data):
        print(f"qwenvl eval: error: data file not found: {args.data}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        print(f"qwenvl eval: error: model folder not found: {args.model}", file=sys.stderr)
        return 2
    try:
        if args.reward_model:
            from transformers import AutoModelForSequenceClassification, AutoProcessor

            model = AutoModelForSequenceClassification.from_pretrained(args.model, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
            result = evaluate_reward_model(model.to(args.device).eval(), processor, args.data, args.batch_size,
                                           args.limit)
        else:
            model, processor = _load_for_inference(args.model, args.device, args.dtype)
            result = evaluate_model(model, processor, args.data, args.batch_size, args.max_new_tokens, args.limit)
    except ValueError as err:
        print(f"qwenvl eval: error: {err}", file=sys.stderr)
        return 2
    report = {"model": os.path.abspath(args.model), "data": os.path.abspath(args.data), "n": result["n"],
              "metrics": result["metrics"]}
    if args.out:
        write_report(args.out, report["metrics"], metadata={k: v for k, v in report.items() if k != "metrics"})
        if "predictions" in result:
            with open(os.path.splitext(args.out)[0] + ".predictions.json", "w", encoding="utf-8") as f:
                json.dump(result["predictions"], f, indent=1, ensure_ascii=False)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, bf16=args.bf16)
    print(f"report: {os.path.join(args.out, 'report.md')}; final checkpoint: {os.path.join(args.out, 'final')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description="Qwen-VL for transformers 5")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an original Qwen-VL snapshot into a hub-ready folder")
    p.add_argument("src", help="folder of the original snapshot (config.json, weights, qwen.tiktoken)")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=_convert)

    p = sub.add_parser("chat", help="chat with a model about images (one answer, or interactive when no question)")
    p.add_argument("question", nargs="*", help="the question; omit it for an interactive, streamed session")
    p.add_argument("--model", required=True, help="a saved qwenvl model folder (model + processor)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--draw", metavar="OUT.png", help="draw the boxes of the answer on the last image")
    p.add_argument("--system", default=None, help="system message (default: the original's)")
    p.add_argument("--trusted-text", action="store_true",
                   help="parse grounding tags typed in the question, e.g. the original prompt '<ref>the cat</ref>'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_chat)

    p = sub.add_parser("eval", help="score a model on a samples.jsonl (or a reward model on a preference.jsonl)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="<split>_samples.jsonl, or <split>_preference.jsonl with --reward-model")
    p.add_argument("--reward-model", action="store_true", help="evaluate a reward model's pairwise accuracy")
    p.add_argument("--out", help="write the JSON report here (and the predictions next to it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="the embedded end-to-end demo: data, stage 1, stage 2, reward model, PPO, eval")
    p.add_argument("--out", default="demo_out", help="output folder (a re-run continues from finished stages)")
    p.add_argument("--quick", action="store_true", help="a reduced size (CI): every stage runs, numbers are small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true",
                   help="train every stage under bf16 autocast (the recipe uses it for stage 2 only, and only where "
                        "this machine's bf16 matmuls are faster than fp32 ones)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
