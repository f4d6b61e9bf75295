"""Peak memory and seconds per training step of one SSO micro-batch.

A Llama with random weights in the shape of Llama-3.1-8B (no hub needed) goes
through sso.py's own load_policy (nf4 base, LoRA on every linear layer, gradient
checkpointing), then the step sso.py trains with: one forward pass over the six
sequences of each triple, the IPO + G + W loss, backward and an AdamW step.
Each sequence has --seq-len tokens, the second half scored as the response.

    python benchmarks/train_step.py                  # the 8B shape, on a GPU
    python benchmarks/train_step.py --layers 2 --hidden-size 256 --intermediate-size 512 \\
        --vocab-size 1024 --seq-len 64               # a small shape, e.g. on a CPU

Random weights change no memory or time: the kernels see the same shapes.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sso  # noqa: E402  (sso.py sits one folder up)

GIB = 2**30


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3.1-8B: %(default)s)")
    p.add_argument("--hidden-size", type=int, default=4096, help="(Llama-3.1-8B: %(default)s)")
    p.add_argument("--intermediate-size", type=int, default=14336, help="(Llama-3.1-8B: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=128256, help="(Llama-3.1-8B: %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="triples per micro-batch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default: %(default)s)")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True,
                   help="nf4 base weights (default: on)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (default: on)")
    return p.parse_args()


def llama_config(args):
    """Llama-3.1-8B's configuration, with the sizes from the command line."""
    heads = max(1, args.hidden_size // 128)  # head dimension 128, as in the 8B model
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0,  # rope_theta and rope_scaling: understood by transformers 4 and 5
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=0, eos_token_id=1, pad_token_id=1)


def write_random_model(args, folder, device, dtype):
    """Save a random-weight model and a stub tokenizer (load_policy wants a chat
    template; the benchmark feeds token ids directly, so the vocabulary is moot)."""
    with torch.device(device):  # initializing 8B weights on the GPU takes seconds, not minutes
        model = AutoModelForCausalLM.from_config(llama_config(args), dtype=dtype)
    model.save_pretrained(folder)
    del model
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1}, unk_token="</s>")),
        bos_token="<s>", eos_token="</s>", pad_token="</s>",
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer.save_pretrained(folder)


def random_micro_batch(args, device):
    """Token ids and masks of one micro-batch: 6 sequences per triple, in the order
    of sso.LOSS_KEYS, as triple_logps stacks them."""
    rows = len(sso.LOSS_KEYS) * args.batch_size
    input_ids = torch.randint(2, args.vocab_size, (rows, args.seq_len), device=device)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, args.seq_len // 2:] = 1
    return input_ids, attention_mask, response_mask


def logps_by_key(model, batch):
    return dict(zip(sso.LOSS_KEYS, sso.sequence_logps(model, *batch).split(len(batch[0]) // len(sso.LOSS_KEYS))))


def main():
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if on_gpu else "no")
    device = accelerator.device
    work = Path(tempfile.mkdtemp(prefix="sso-bench-"))
    try:
        write_random_model(args, work, device, torch.bfloat16 if on_gpu else torch.float32)
        if on_gpu:
            torch.cuda.empty_cache()
        sso_args = sso.parse_args(["--model", str(work), "--batch-size", str(args.batch_size),
                                   "--load-in-4bit" if args.load_in_4bit else "--no-load-in-4bit"]
                                  + (["--gradient-checkpointing"] if args.gradient_checkpointing else []))
        _, model = sso.load_policy(sso_args, accelerator)
    finally:
        shutil.rmtree(work)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sso_args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = random_micro_batch(args, device)
    with torch.no_grad():  # the reference: the policy before the first update, as in sso.py
        model.eval()
        ref = logps_by_key(model, batch)
    model.train()
    if on_gpu:
        weights_gib = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        losses, _ = sso.sso_loss(logps_by_key(model, batch), ref, sso_args.beta, sso_args.alpha, sso_args.theta)
        accelerator.backward(losses.mean())
        optimizer.step()
        optimizer.zero_grad()
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds[1:])  # the first step pays for allocator and kernel warm-up
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "layers": args.layers, "hidden_size": args.hidden_size, "seq_len": args.seq_len,
        "sequences_per_step": len(batch[0]), "load_in_4bit": args.load_in_4bit,
        "gradient_checkpointing": args.gradient_checkpointing, "lora_parameters": trainable,
        "seconds_per_step": round(step, 3), "tokens_per_second": round(len(batch[0]) * args.seq_len / step),
        "loss": round(losses.mean().item(), 4),
    }
    if on_gpu:
        result["weights_gib"] = round(weights_gib, 2)
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
