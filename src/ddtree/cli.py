"""The `ddtree` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import DDTreeError
from .results import shared_prefix

# Optional dependencies, by the extra that installs them (the core install decodes; these serve and plot).
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "httpx": "serve",
          "matplotlib": "bench"}
TARGET_HELP = ("target model: a Hugging Face model directory or Hub id (Qwen/Qwen3-8B, fetched into the Hugging "
               "Face cache or found there offline), a .gguf file, or 'smollm2-135m-instruct' (default)")
DRAFTER_HELP = ("drafter in the z-lab DFlash format: a directory or Hub id (z-lab/Qwen3-8B-DFlash-b16), or 'random' "
                "for an untrained one (default: the drafter bundled with the target)")


def add_model_options(parser: argparse.ArgumentParser, decoding: bool = False) -> None:
    parser.add_argument("--target", help=TARGET_HELP)
    parser.add_argument("--drafter", help=DRAFTER_HELP)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    if decoding:
        parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                            help="run every forward eagerly on cuda (slower; for measuring what the graphs save)")
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the target's and the drafter's layers (fuses the small kernels "
                                 "around each GEMM; the first use of each shape compiles, which takes seconds)")
        add_dummy_weights_option(parser)
        parser.add_argument("--matmul-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                            help="the weights' dtype in the layers' matrix products. auto (default): bfloat16 for a "
                                 "float32 model on a CPU with AMX, where a tree's rows then cost about what one "
                                 "row does; activations, attention and the target's logits stay float32, so output "
                                 "is the target's with bfloat16 products (float32: exactly the float32 target's); "
                                 "elsewhere the model's dtype")
        parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                            help="the drafter proposes only the N tokens most frequent in its training answers "
                                 "(token_counts.json beside it, written by train-drafter): a smaller vocabulary "
                                 "GEMM and top-k every draft (Qwen3's head has 151,936 rows); output is unchanged, "
                                 "a rarer token just ends the draft there (default: the whole vocabulary)")


def add_dummy_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dummy-weights", action="store_true",
                        help="random weights of the target's (and drafter's) config shape, made on the device: "
                             "--target and --drafter may then be directories holding only a config.json, Hub ids "
                             "(only their configs and tokenizers are fetched), or "
                             "the name of a config shipped with ddtree (qwen3-4b, qwen3-8b, qwen3-30b-a3b, "
                             "llama-3.1-8b-instruct; drafter qwen3-8b-dflash-b16). Measures speed at a real "
                             "shape without the weights; the text is noise. Without a tokenizer beside the "
                             "config, the default target's is used")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["ar", "dflash", "ddtree"], default="ddtree",
                        help="ar: target alone; dflash: one drafted chain per round; ddtree: a draft tree (default)")
    parser.add_argument("--budget", type=budget_value, default=None,
                        help="ddtree: drafted nodes per round, root not counted, or 'auto' to choose per round from "
                             "this device's measured costs (calibrated once per device and model pair, stored in "
                             "the cache directory) (default auto)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for sampling (default: random); a seed gives the same text with every "
                             "method and budget")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="at most this many new tokens (default 256)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the output contains TEXT (not included in the output); repeatable")


def comma(kind):
    """An argparse type for comma-separated values of `kind`."""
    return lambda text: [kind(x) for x in text.split(",") if x]


def budget_value(text: str) -> int | str:
    """A tree budget: 'auto' (chosen per round from this device's costs) or a node count."""
    from .options import parse_budget

    try:
        return parse_budget(text)
    except DDTreeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_drafter_shape_options(parser: argparse.ArgumentParser, default_layers: int) -> None:
    parser.add_argument("--layers", type=int, default=default_layers,
                        help=f"decoder layers of a new drafter (default {default_layers})")
    parser.add_argument("--block-size", type=int, default=16,
                        help="tokens per drafted block, bonus included (default 16)")
    parser.add_argument("--target-layer-ids", type=comma(int),
                        help="comma-separated target layers whose outputs feed the drafter (default: spread evenly)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddtree",
        description="Lossless speculative decoding: a DFlash drafter proposes a block, DDTree verifies the best "
                    "tree of continuations in one target pass. Output equals the target's own.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from a prompt",
                              description="Generate from a prompt with ar, dflash or ddtree and report the speed.")
    add_model_options(gen, decoding=True)
    add_generation_options(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file ('-' for standard input)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the target's chat template as a user message "
                          "(always on for the default target)")
    gen.add_argument("--raw", action="store_true", help="never apply the chat template, even for the default target")
    gen.add_argument("--compare", action="store_true", help="also run the target alone (ar) and print both speeds")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.set_defaults(handler=run_generate)

    init = commands.add_parser("init-drafter", help="write a randomly initialised drafter for a target",
                               description="Write an untrained DFlash drafter shaped for a target, in the published "
                                           "z-lab format (the starting point of training).")
    init.add_argument("--target", required=True, help=TARGET_HELP)
    add_drafter_shape_options(init, default_layers=1)
    init.add_argument("--mask-token-id", type=int, help="token id of the mask token (default: an unused special token)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    init.add_argument("--out", required=True, help="output directory")
    init.set_defaults(handler=run_init_drafter)

    bench = commands.add_parser("bench", help="benchmark methods on prompt sets",
                                description="Run ar, dflash and ddtree (a budget sweep) over prompt sets in one "
                                            "engine; write a results JSON (device, versions, commit, command, every "
                                            "response), a markdown table and PNG plots next to it. Under torchrun "
                                            "(e.g. torchrun --nproc_per_node 2 -m ddtree.cli bench ...) the "
                                            "prompts are sharded over the processes, one GPU each (gloo on the "
                                            "CPU), and rank 0 writes the gathered results.")
    add_model_options(bench, decoding=True)
    bench.add_argument("--datasets", type=comma(str), default=["gsm8k", "mt-bench"],
                       help="comma-separated: mt-bench, mt-bench-first, gsm8k, math500, humaneval, mbpp, alpaca, "
                            "or .jsonl files with 'prompt' or 'turns' (default gsm8k,mt-bench)")
    bench.add_argument("--methods", type=comma(str), default=["ar", "dflash", "ddtree"],
                       help="comma-separated subset of hf,ar,dflash,ddtree (default ar,dflash,ddtree); hf is "
                            "transformers' own generate() on the same weights")
    bench.add_argument("--hf-limit", type=int, default=5, help="hf runs only the first N prompts (slow; default 5)")
    bench.add_argument("--budgets", type=comma(budget_value), default=[16, 64, 256],
                       help="ddtree budgets, 'auto' among them if wanted (default 16,64,256)")
    bench.add_argument("--temperatures", type=comma(float), default=[0.0], help="comma-separated (default 0)")
    bench.add_argument("--limit", type=int, help="only the first N prompts of each dataset")
    bench.add_argument("--max-new-tokens", type=int, default=256, help="per response (default 256)")
    bench.add_argument("--repeats", type=int, default=1, help="time every response this many times; median (default 1)")
    bench.add_argument("--seed", type=int, default=0, help="sampling seed at temperature > 0 (default 0)")
    bench.add_argument("--concurrency", type=comma(int),
                       help="comma-separated levels, e.g. 1,4,8,16,32: decode each set's prompts that many at a time "
                            "(continuous batching; throughput, latency and time to first token per level)")
    bench.add_argument("--data-dir", help="the evaluation sets' files (default: $DDTREE_DATA_DIR)")
    bench.add_argument("--out", required=True,
                       help="results JSON path, xz-compressed when it ends in .json.xz (the table goes to the "
                            "same name with .md)")
    bench.set_defaults(handler=run_bench)

    prof = commands.add_parser("profile", help="time each stage of a decoding round",
                               description="Time each stage of a round (draft, tree, verify, commit, host) per "
                                           "method and budget on this device: one warm-up, then the median of "
                                           "--repeats runs of the same prompt. Prints a table; --out also "
                                           "writes JSON.")
    add_model_options(prof, decoding=True)
    prof.add_argument("--methods", type=comma(str), default=["ar", "dflash", "ddtree"],
                      help="comma-separated subset of ar,dflash,ddtree (default: all three)")
    prof.add_argument("--budgets", type=comma(budget_value), default=[16, 64, 256],
                      help="ddtree budgets, 'auto' among them if wanted (default 16,64,256)")
    prof.add_argument("--calibrate", action="store_true",
                      help="(re)measure this device's round costs for --budget auto, store them, and print them")
    prof.add_argument("--prompt", default="Write a short story about a robot who learns to paint.",
                      help="the prompt, through the chat template where the target has one")
    prof.add_argument("--max-new-tokens", type=int, default=128, help="per run (default 128)")
    prof.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    prof.add_argument("--out", help="also write the profiles as JSON here")
    prof.set_defaults(handler=run_profile)

    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                                description="Serve /v1/chat/completions, /v1/completions (both with stream: true), "
                                            "/v1/models, /health and /metrics over one engine. Requests queue, "
                                            "first come first served, and up to --max-batch decode together "
                                            "(joining and leaving between rounds); requests may set "
                                            "'method' and 'budget' (and 'top_k') besides OpenAI's fields.")
    add_model_options(serve, decoding=True)
    serve.add_argument("--method", choices=["ar", "dflash", "ddtree"], default="ddtree",
                       help="default method for requests that do not name one (default ddtree)")
    serve.add_argument("--budget", type=budget_value,
                       help="default ddtree budget for requests that give none: nodes, or 'auto' (default auto)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests that may wait; past that the server answers 503 (default 64)")
    serve.add_argument("--max-batch", type=int,
                       help="requests decoding at once (default: on a GPU as many as half its free memory holds "
                            "at --prepare-context tokens each, at most 32; on the CPU 1)")
    serve.add_argument("--model-name", help="the model id clients send (default: the target's name)")
    serve.add_argument("--max-budget", type=int,
                       help="the largest tree budget a request may ask for (default: the largest size auto uses on "
                            "this device; requests above it get 400)")
    serve.add_argument("--api-key", default=os.environ.get("DDTREE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $DDTREE_API_KEY; "
                            "none: open)")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host header names NAME (repeatable); a loopback server "
                            "answers only localhost names unless told, so web pages cannot reach it by DNS rebinding")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20,
                       help="the largest request body taken (default 4 MiB; larger ones get 413)")
    serve.add_argument("--prepare-context", type=int, default=2048,
                       help="at start, calibrate auto and capture the default method's CUDA graphs for requests "
                            "of up to this many tokens, prompt and answer (default 2048; 0: on first use)")
    serve.set_defaults(handler=run_serve)

    load = commands.add_parser("loadtest", help="load-test a running server",
                               description="N concurrent streaming chat clients against a server for M seconds; "
                                           "prints throughput and latency percentiles (time to first token, total).")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default http://127.0.0.1:8000)")
    load.add_argument("--model", help="model id (default: the first the server lists)")
    load.add_argument("--clients", type=comma(int), default=[4],
                      help="concurrent clients; comma-separated counts run one after the other (default 4)")
    load.add_argument("--seconds", type=float, default=30, help="how long to send requests (default 30)")
    load.add_argument("--max-tokens", type=int, default=64, help="per request (default 64)")
    load.add_argument("--prompt", default="Write a short story about a robot who learns to paint.",
                      help="the chat prompt every client sends")
    load.add_argument("--method", choices=["ar", "dflash", "ddtree"], help="ask for this method")
    load.add_argument("--budget", type=budget_value, help="ask for this ddtree budget (or 'auto')")
    load.add_argument("--out", help="also write the results as JSON here")
    load.set_defaults(handler=run_loadtest)

    prompts = commands.add_parser("prompts", help="collect drafter-training prompts, free of evaluation overlap",
                                  description="Collect GSM8K-train and ShareGPT prompts, drop duplicates and any "
                                              "prompt sharing a word 8-gram with an evaluation set, write JSONL.")
    prompts.add_argument("--data-dir", help="the evaluation sets' files, whose prompts training data must avoid (default: $DDTREE_DATA_DIR)")
    prompts.add_argument("--sharegpt-limit", type=int, help="use at most this many ShareGPT prompts (of each kind)")
    prompts.add_argument("--sharegpt-later-turns", action="store_true",
                         help="also use ShareGPT's user turns after the first, each as a prompt of its own "
                              "(about 41,000 more chat prompts once duplicates go; the first turns alone are about 9,000)")
    prompts.add_argument("--out", required=True, help="output JSONL file")
    prompts.set_defaults(handler=run_prompts)

    regen = commands.add_parser("regenerate", help="answer training prompts with the target (batched)",
                                description="Regenerate responses to training prompts with the target itself, "
                                            "through its chat template, and save prompt+response token ids (.npz). "
                                            "Under torchrun the prompts are shared out over the processes, one GPU each.")
    add_model_options(regen)
    add_dummy_weights_option(regen)
    regen.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line (see `ddtree prompts`)")
    regen.add_argument("--out", required=True, help="output .npz of token sequences")
    regen.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (default 256)")
    regen.add_argument("--batch-size", type=int, default=256, help="prompts per batch (default 256)")
    regen.add_argument("--limit", type=int, help="only the first N prompts")
    regen.add_argument("--temperature", type=float, default=0.0,
                       help="0 answers greedily (default); above 0 samples, which adds what the target says "
                            "when sampling to the drafter's data")
    regen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    regen.set_defaults(handler=run_regenerate)

    train = commands.add_parser("train-drafter", help="train a DFlash drafter (the whole recipe, or on given data)",
                                description="Train a DFlash drafter for a target: frozen target features, random "
                                            "anchors in responses, block-sparse attention, position-decayed loss, "
                                            "AdamW with cosine schedule. Checkpoints are drafters in the published "
                                            "format; a held-out set reports teacher-forced acceptance. Under torchrun "
                                            "each process (one GPU each) takes a share of every batch (with --data). "
                                            "Without --data it runs the whole recipe into the work directory OUT: "
                                            "OUT/prompts.jsonl (as `ddtree prompts`, or --prompts), "
                                            "OUT/data-greedy.npz and OUT/data-sampled.npz (as `ddtree regenerate` at "
                                            "temperature 0 and 1), training into OUT/drafter, whose last step "
                                            "evaluates it, and the model card OUT/drafter/README.md. Each phase "
                                            "is skipped when its output is there and training resumes, so the same "
                                            "command called again goes on where the last call stopped.")
    add_model_options(train)
    add_dummy_weights_option(train)
    train.add_argument("--data", nargs="+",
                       help="one or more .npz files from `ddtree regenerate`: train on them alone, into OUT "
                            "(without it: the whole recipe, see above)")
    train.add_argument("--out", required=True,
                       help="with --data, the drafter directory (checkpoints, metrics.jsonl); without, the work "
                            "directory of every phase (the drafter in OUT/drafter)")
    train.add_argument("--init", help="start from this drafter instead of a random one")
    recipe = train.add_argument_group("the recipe (without --data)")
    recipe.add_argument("--prompts", help="JSONL with a 'prompt' field per line to answer, instead of collecting "
                                          "GSM8K-train and ShareGPT prompts as `ddtree prompts` does")
    recipe.add_argument("--data-dir", help="the evaluation sets' files, whose prompts the collected ones must avoid "
                                           "(default: $DDTREE_DATA_DIR)")
    recipe.add_argument("--sampled-share", type=float, default=1.0,
                        help="share of the prompts answered a second time, sampled at temperature 1 (what sampling "
                             "decodes), beside the greedy answer every prompt gets; 1, the default, is the bundled "
                             "drafter's recipe, 0 trains on greedy answers alone")
    recipe.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap (default 256)")
    recipe.add_argument("--regenerate-batch-size", type=int, default=256,
                        help="prompts per batch when the target answers (default 256)")
    add_drafter_shape_options(train, default_layers=2)
    train.add_argument("--resume", action="store_true",
                       help="with --data, continue from OUT/train_state.pt (the recipe always resumes)")
    defaults = train_config_defaults()
    for name, value in defaults.items():
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        described = f"{TRAIN_OPTION_HELP[name]} (default {shown})"
        if isinstance(value, tuple):
            train.add_argument(f"--{name.replace('_', '-')}", type=lambda s: tuple(comma(int)(s)),
                               default=value, help=described)
        else:
            train.add_argument(f"--{name.replace('_', '-')}", type=float if isinstance(value, float) or value is None
                               else int, default=value, help=described)
    train.set_defaults(handler=run_train)
    return parser


TRAIN_OPTION_HELP = {
    "epochs": "passes over the training sequences",
    "batch_size": "sequences per optimizer step (split over the processes under torchrun)",
    "anchors": "random block anchors per sequence per step",
    "max_len": "sequences are cut to this many tokens",
    "lr": "peak learning rate of the cosine schedule",
    "warmup": "share of the steps spent warming the learning rate up",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient norm clip",
    "gamma": "loss weight exp(-(k-1)/gamma) at block position k; none picks 7 for block 16",
    "accept_loss": "weight of a loss term that rewards the block's expected accepted length (teacher-forced); "
                   "0 trains on cross-entropy alone",
    "distill": "share of each position's loss taken by the KL divergence from the target's own next-token "
               "distribution (from the same target pass; what sampling at temperature > 0 rewards); 0 trains on "
               "cross-entropy alone",
    "eval_every": "steps between held-out acceptance evaluations",
    "save_every": "steps between checkpoints",
    "eval_sequences": "held-out sequences for the acceptance evaluation",
    "eval_budgets": "tree budgets at which the evaluation reports τ",
    "seed": "seed for the data order, anchors and a random initial drafter",
    "max_minutes": "stop cleanly after this many minutes: with --data, checkpoint and stop training (go on with "
                   "--resume); without, no phase starts after it and training checkpoints and stops (the same "
                   "command goes on); none runs to the end",
}


def train_config_defaults() -> dict:
    from dataclasses import asdict

    from .train import TrainConfig

    return asdict(TrainConfig())


def load_engine(args, device: str | None = None, quiet: bool = False):
    """The engine a decoding command's model options ask for (`device` overrides --device)."""
    from .api import load

    return load(args.target, args.drafter, device or args.device, args.dtype, quiet=quiet,
                cuda_graphs=args.cuda_graphs, compile=args.compile, dummy_weights=args.dummy_weights,
                draft_vocab=args.draft_vocab, matmul_dtype=args.matmul_dtype)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        if args.prompt_file == "-":
            return sys.stdin.read()
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise DDTreeError(f"cannot read the prompt file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DDTreeError(f"the prompt file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def generation_options(args):
    """The request options of `generate`'s arguments, validated before any model loads."""
    from .options import GenerationOptions

    return GenerationOptions.of(method=args.method, budget=args.budget, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop=args.stop)


def run_generate(args) -> None:
    from dataclasses import replace

    from .api import DEFAULT_TARGET
    from .options import Decoding

    prompt = read_prompt(args)
    if not prompt.strip():
        raise DDTreeError("the prompt is empty")
    options = generation_options(args)
    engine = load_engine(args)
    chat = (args.chat or (args.target in (None, DEFAULT_TARGET))) and not args.raw
    if args.stream and not args.json:
        for chunk in engine.stream(prompt, options, chat=chat):
            print(chunk.text, end="", flush=True)
        print()
        return
    engine.generate(prompt, replace(options, max_new_tokens=min(8, options.max_new_tokens)), chat=chat)  # warm-up
    result = engine.generate(prompt, options, chat=chat)
    baseline = engine.generate(prompt, replace(options, decoding=Decoding("ar")), chat=chat) if args.compare else None
    if args.json:
        out = result.to_json()
        if baseline is not None:
            out["baseline"] = baseline.to_json() | {"speedup": speedup(result, baseline)}
        print(json.dumps(out))
        return
    print_generation(result, baseline, engine.exact)


def print_generation(result, baseline, exact: bool) -> None:
    """The text, then the speed (and the target alone's, compared) on stderr. `exact`: the engine computes in
    float32 throughout, where any difference from the target alone would be a fault."""
    print(result.text)
    print(f"\n[{result.method}{'' if result.budget is None else f' budget {result.budget}'}] "
          f"{result.num_new_tokens} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tok/s, "
          f"mean acceptance {result.mean_acceptance:.2f} over {result.rounds} rounds", file=sys.stderr)
    if baseline is not None:
        if baseline.token_ids == result.token_ids:
            same = "identical output"
        elif exact:
            same = "OUTPUTS DIFFER"
        else:  # (bf16 rounds a wide verify and a one-row step differently; a near-tie can go either way)
            first = shared_prefix(result.token_ids, baseline.token_ids)
            same = (f"outputs differ from token {first}: a near-tie rounded differently in bfloat16; "
                    "--dtype float32 --matmul-dtype float32 reproduces the target alone token for token")
        print(f"[ar] {baseline.num_new_tokens} tokens in {baseline.seconds:.2f} s = "
              f"{baseline.tokens_per_second:.1f} tok/s; speedup {speedup(result, baseline):.2f}x ({same})",
              file=sys.stderr)


def speedup(result, baseline) -> float:
    """Baseline time per token over the method's time per token."""
    if not result.num_new_tokens or not baseline.num_new_tokens or result.seconds <= 0:
        return 0.0
    return (baseline.seconds / baseline.num_new_tokens) / (result.seconds / result.num_new_tokens)


def run_init_drafter(args) -> None:
    from .api import init_drafter

    drafter = init_drafter(args.target, args.out, args.layers, args.block_size, args.mask_token_id,
                           args.target_layer_ids, args.seed)
    cfg = drafter.cfg
    print(f"wrote a random {cfg.num_layers}-layer drafter (block {cfg.block_size}, target layers "
          f"{cfg.target_layer_ids}, mask token {cfg.mask_token_id}) to {args.out}")


def method_specs(methods: list[str], budgets: list, allowed: tuple[str, ...]) -> list:
    """One Decoding per method, and per budget for ddtree (`hf`: bench's transformers baseline); an unknown
    method or a bad budget is an error up front."""
    from .bench import HF
    from .options import Decoding

    specs = []
    for method in methods:
        if method not in allowed:
            raise DDTreeError(f"unknown method {method!r} in --methods; choose from {','.join(allowed)}")
        if method == HF.method:
            specs.append(HF)
        else:
            specs += [Decoding(method, b) for b in budgets] if method == "ddtree" else [Decoding(method)]
    return specs


def check_writable(path: str, option: str) -> None:
    """Refuses an output path that cannot be written before a long run, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DDTreeError(f"{option} {path}: cannot make its folder ({exc.strerror})") from None
    if os.path.isdir(path) or not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DDTreeError(f"{option} {path}: cannot write there")


def run_bench(args) -> None:
    from .bench import bench
    from .parallel import data_parallel

    specs = method_specs(args.methods, args.budgets, ("hf", "ar", "dflash", "ddtree"))
    if args.repeats < 1:
        raise DDTreeError("--repeats must be >= 1")
    if args.concurrency and min(args.concurrency) < 1:
        raise DDTreeError("--concurrency levels must be >= 1")
    check_writable(args.out, "--out")
    with data_parallel(args.device) as (rank, device):
        engine = load_engine(args, device, quiet=rank != 0)
        result = bench(engine, args.datasets, specs, args.temperatures, args.limit, args.max_new_tokens,
                       args.repeats, args.seed, args.data_dir, args.hf_limit, args.concurrency)
        if rank == 0:
            write_bench_outputs(result, args.out)


def write_bench_outputs(result: dict, out: str) -> None:
    from .bench import markdown_table, plot, results_opener

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with results_opener(out)(out, "wt", encoding="utf-8") as f:
        json.dump(result, f)
    prefix = os.path.splitext(out.removesuffix(".xz"))[0]
    table = markdown_table(result)
    with open(prefix + ".md", "w") as f:
        f.write(table)
    print(table)
    for path in plot(result, prefix):
        print(f"wrote {path}", file=sys.stderr)


def run_profile(args) -> None:
    from .bench import environment
    from .loading import peak_host_memory
    from .profile import profile, profile_table, roofline, summary_lines, table_row

    specs = method_specs(args.methods, args.budgets, ("ar", "dflash", "ddtree"))
    if args.repeats < 1:
        raise DDTreeError("--repeats must be >= 1")
    if args.out:
        check_writable(args.out, "--out")
    engine = load_engine(args)
    if args.calibrate:
        from .costs import costs_table

        if engine.drafter is None:
            raise DDTreeError("--calibrate measures drafting rounds and needs a drafter")
        engine.use_costs(engine.calibration([1], force=True), fresh=True)
        print(costs_table(engine.autos.at(1).costs))
        print(f"stored in {engine.calibration_key().path}", file=sys.stderr)
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    ids = engine.encode(args.prompt, chat=has_template)
    profiles = []
    for spec in specs:
        profiles.append(profile(engine, ids, spec, args.max_new_tokens, args.repeats))
        print(table_row(profiles[-1], None), file=sys.stderr, flush=True)  # progress, as each one finishes
    table = profile_table(profiles)
    print(table)
    memory = roofline(engine, next((p for p in profiles if p.method == "ar"), None))
    loading = {"load_seconds": engine.target.load_seconds, "peak_host_rss": peak_host_memory()}
    print(summary_lines(memory, loading))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(environment(engine) | {"prompt_tokens": len(ids), "max_new_tokens": args.max_new_tokens,
                                             "profiles": [p.to_json() for p in profiles], "table": table,
                                             "roofline": memory, "loading": loading}, f, indent=1)


def run_serve(args) -> None:
    from .generation import default_max_batch
    from .costs import candidate_sizes
    from .options import Decoding
    from .server import LOOPBACK_NAMES, ServerSettings, serve

    if args.max_queue < 1 or args.max_body_bytes < 1 or args.prepare_context < 0 or (args.max_batch or 1) < 1:
        raise DDTreeError("--max-queue, --max-batch and --max-body-bytes must be >= 1, --prepare-context >= 0")
    decoding = Decoding(args.method, args.budget)
    engine = load_engine(args)
    max_budget = args.max_budget or max(candidate_sizes(engine.device.type, engine.block - 1,
                                                        engine.model.cfg.vocab_size))
    if isinstance(decoding.budget, int) and decoding.budget > max_budget:
        raise DDTreeError(f"--budget {decoding.budget} is over --max-budget {max_budget}")
    loopback = args.host in LOOPBACK_NAMES
    hosts = tuple(LOOPBACK_NAMES) + tuple(args.allow_host) if loopback or args.allow_host else None
    context = args.prepare_context or 2048
    max_batch = args.max_batch or default_max_batch(engine, context)
    if args.prepare_context:  # auto's calibration and the graphs, before the first request waits for them
        graphs = engine.prepare(decoding, args.prepare_context, batch=max_batch)
        print(f"ddtree: prepared {decoding.label} for requests of up to {args.prepare_context} tokens "
              f"({graphs} CUDA graphs)", file=sys.stderr)
    settings = ServerSettings(args.model_name or engine.target.name, decoding, args.max_queue, max_budget,
                              args.max_body_bytes, args.api_key, hosts, max_batch, context)
    print(f"ddtree: up to {max_batch} requests decode at once", file=sys.stderr)
    serve(engine, settings, args.host, args.port)


def run_loadtest(args) -> None:
    import asyncio

    import httpx

    from .loadtest import run_levels, summary_table

    if min(args.clients) < 1 or args.seconds <= 0 or args.max_tokens < 1:
        raise DDTreeError("--clients and --max-tokens must be >= 1 and --seconds > 0")
    extra = {k: v for k, v in (("method", args.method), ("budget", args.budget)) if v is not None}
    if args.out:
        check_writable(args.out, "--out")
    try:
        result = asyncio.run(run_levels(args.url, args.model, args.clients, args.seconds, args.prompt, args.max_tokens,
                                        extra))
    except httpx.HTTPError as exc:
        raise DDTreeError(f"cannot reach the server at {args.url}: {exc}") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise DDTreeError(f"the server at {args.url} does not answer /v1/models as an OpenAI-compatible server "
                          "does") from None
    print(summary_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result | {"command": " ".join(sys.argv)}, f, indent=1)


def run_prompts(args) -> None:
    from .data import training_prompts
    from .evalsets import write_jsonl

    rows, report = training_prompts(args.data_dir, args.sharegpt_limit, args.sharegpt_later_turns)
    write_jsonl(rows, args.out)
    print(json.dumps({"prompts": len(rows), "sources": report}))


def run_regenerate(args) -> None:
    from .api import load
    from .evalsets import read_jsonl
    from .parallel import data_parallel
    from .pipeline import regenerate_file

    rows = read_jsonl(args.prompts)[: args.limit]
    if not rows:
        raise DDTreeError(f"no prompts in {args.prompts}")
    with data_parallel(args.device) as (rank, device):
        engine = load(args.target, "random", device, args.dtype, quiet=True, dummy_weights=args.dummy_weights,
                      matmul_dtype=None)  # (training answers from the target as stored)
        summary = regenerate_file(engine, rows, args.out, args.max_new_tokens, args.batch_size, args.temperature,
                                  args.seed, rank)
        if rank == 0:
            print(json.dumps(summary))


def run_train(args) -> None:
    if not args.data:
        return run_train_recipe(args)
    from .api import pick_device, pick_dtype
    from .data import SequenceFile
    from .loading import load_target
    from .parallel import data_parallel
    from .train import train

    with data_parallel(args.device) as (rank, device_name):
        device = pick_device(device_name)
        target = load_target(args.target or "smollm2-135m-instruct", device, pick_dtype(args.dtype, device),
                             dummy=args.dummy_weights)
        sequences, starts = SequenceFile.load(args.data)
        drafter = drafter_shape(args).make(target, args.seed)
        final = train(target, drafter, sequences, starts, args.out, train_config(args), resume=args.resume)
        if rank == 0:
            print(json.dumps(final))


def run_train_recipe(args) -> None:
    """train-drafter without --data: every phase of the recipe into OUT, each skipped when done."""
    import shlex

    from .api import load
    from .pipeline import Recipe, run_recipe

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DDTreeError("under torchrun, train-drafter needs --data (the one-command recipe runs in one process)")
    if not 0 <= args.sampled_share <= 1:
        raise DDTreeError(f"--sampled-share is a share of the prompts, between 0 and 1 (got {args.sampled_share})")
    engine = load(args.target, "random", args.device, args.dtype, quiet=True, dummy_weights=args.dummy_weights,
                  matmul_dtype=None)  # (training answers and features from the target as stored)
    recipe = Recipe(args.target or "smollm2-135m-instruct", args.out, args.prompts, args.data_dir,
                    args.sampled_share, args.max_new_tokens, args.regenerate_batch_size,
                    shlex.join(args.command_line))
    final = run_recipe(recipe, engine, drafter_shape(args), train_config(args))
    if final:
        print(json.dumps(final))


def drafter_shape(args):
    from .pipeline import DrafterShape

    return DrafterShape(args.layers, args.block_size, args.target_layer_ids, args.init)


def train_config(args):
    from .train import TrainConfig

    return TrainConfig(**{name: getattr(args, name) for name in train_config_defaults()})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = ["ddtree", *(sys.argv[1:] if argv is None else argv)]
    try:
        args.handler(args)
    except DDTreeError as exc:
        print(f"ddtree: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in EXTRAS:
            raise
        print(f"ddtree: error: `ddtree {args.command}` needs {exc.name}: pip install 'ddtree[{EXTRAS[exc.name]}]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddtree: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
