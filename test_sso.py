"""Tests for sso.py: the loss math without a model, the plumbing on a tiny random
Llama, the real offline SmolLM2-135M once, and every user-facing error."""
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import sso

HERE = Path(__file__).resolve().parent

# ---- the loss math (SSO-SPEC §1-3) ----

PAIRS = {  # metric prefix -> (winner key, loser key), SSO-SPEC §2
    "rewards": ("chosen", "rejected"),
    "rewards_pos": ("pos_chosen", "pos_rejected"),
    "rewards_neg": ("neg_original", "neg_chosen"),
}


def random_logps(batch, seed, dtype=torch.float64, requires_grad=False):
    """{key: [batch]} average log-probs drawn uniformly from [-3, -0.1]."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sso.LOSS_KEYS:
        values = (-3.0 + 2.9 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(dtype)
        out[key] = values.requires_grad_(requires_grad)
    return out


def independent_sso_loss(p, r, beta, alpha, theta, use_weight=True):
    """SSO-SPEC §2 written out independently of sso.py: returns (loss, base, G, W)."""
    target = 1.0 / (2.0 * beta)

    def ipo(winner, loser):
        deviation = (p[winner] - r[winner]) - (p[loser] - r[loser]) - target
        return deviation * deviation

    base = ipo("chosen", "rejected")
    steering = ipo("pos_chosen", "pos_rejected") + ipo("neg_original", "neg_chosen")
    if use_weight:  # sigmoid(-z) == 1 / (1 + exp(z))
        weight = 1.0 / (1.0 + torch.exp(alpha * p["chosen"] + (1.0 - alpha) * p["rejected"]))
    else:
        weight = torch.ones_like(base)
    return base + theta * weight * steering, base, steering, weight


def grads_of(loss, p):
    """Gradients of loss.sum() w.r.t. the six policy tensors, as {key: grad}."""
    grads = torch.autograd.grad(loss.sum(), [p[k] for k in sso.LOSS_KEYS])
    return dict(zip(sso.LOSS_KEYS, grads))


def test_ipo_loss_at_reference_is_target_squared():
    """With policy == reference, h = 0 and L = (1/(2β))² exactly: 6.25 for β = 0.2."""
    logps = torch.tensor([-0.3, -1.7, -2.9])
    other = torch.tensor([-2.2, -0.4, -1.1])
    loss = sso.ipo_loss(logps, other, logps.clone(), other.clone(), beta=0.2)
    assert torch.equal(loss, torch.full((3,), 6.25))
    assert torch.equal(sso.ipo_loss(logps, other, logps, other, beta=0.5), torch.ones(3))


def test_ipo_loss_hand_value_nonzero_margin():
    """A hand-worked case with h != 0 (all numbers exact in binary floating point)."""
    # chosen: -1.0 - (-1.5) = 0.5;  rejected: -2.0 - (-1.75) = -0.25
    # h = 0.5 - (-0.25) = 0.75;  L = (0.75 - 1/(2*0.2))² = (0.75 - 2.5)² = 1.75² = 3.0625
    loss = sso.ipo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
                        torch.tensor([-1.5]), torch.tensor([-1.75]), beta=0.2)
    assert loss.item() == 3.0625


def test_steering_weight_hand_values():
    """W = sigmoid(-(α·chosen + (1-α)·rejected)) on hand values, and its range."""
    # α=0.66, chosen=-1, rejected=-2: -(0.66·(-1) + 0.34·(-2)) = 0.66 + 0.68 = 1.34
    weight = sso.steering_weight(torch.tensor([-1.0], dtype=torch.float64),
                                 torch.tensor([-2.0], dtype=torch.float64), alpha=0.66)
    assert weight.item() == pytest.approx(1 / (1 + math.exp(-1.34)), abs=1e-12)  # ≈ 0.7925
    # α=1 uses only chosen; at log-prob 0 the weight is exactly 1/2.
    assert sso.steering_weight(torch.tensor([0.0]), torch.tensor([-5.0]), alpha=1.0).item() == 0.5
    # Average log-probs are <= 0, so W lies in [0.5, 1).
    p = random_logps(64, seed=1)
    weight = sso.steering_weight(p["chosen"], p["rejected"], alpha=0.66)
    assert bool(((weight >= 0.5) & (weight < 1)).all())


def test_sso_loss_hand_value_single_example():
    """L_SSO = base + θ·W·(L(x+,y+,y-) + L(x-,y°,y+)) on one hand-worked example."""
    policy = {"chosen": -1.0, "rejected": -2.0, "pos_chosen": -0.5, "pos_rejected": -2.5,
              "neg_original": -1.0, "neg_chosen": -3.0}
    ref = {"chosen": -1.5, "rejected": -1.75, "pos_chosen": -1.0, "pos_rejected": -2.0,
           "neg_original": -1.0, "neg_chosen": -3.0}
    # base:  h = 0.5 - (-0.25) = 0.75  -> (0.75 - 2.5)² = 3.0625
    # g_pos: h = 0.5 - (-0.5)  = 1.0   -> (1.0 - 2.5)²  = 2.25
    # g_neg: h = 0.0 - 0.0     = 0.0   -> (0.0 - 2.5)²  = 6.25
    # W = sigmoid(1.34) ≈ 0.792488;  L = 3.0625 + 0.1·W·8.5 ≈ 3.736115
    policy, ref = ({k: torch.tensor([v], dtype=torch.float64) for k, v in d.items()} for d in (policy, ref))
    loss, metrics = sso.sso_loss(policy, ref, beta=0.2, alpha=0.66, theta=0.1)
    weight = 1 / (1 + math.exp(-1.34))
    assert loss.item() == pytest.approx(3.0625 + 0.1 * weight * 8.5, abs=1e-12)
    assert metrics["loss/base"].item() == 3.0625
    assert metrics["loss/g_pos"].item() == 2.25
    assert metrics["loss/g_neg"].item() == 6.25
    assert metrics["weight"].item() == pytest.approx(weight, abs=1e-12)


@pytest.mark.parametrize("beta, alpha, theta", [(0.2, 0.66, 0.1), (0.05, 0.3, 1.5), (1.0, 1.0, 0.01)])
def test_sso_loss_matches_independent_derivation(beta, alpha, theta):
    """Per-example loss and gradients w.r.t. all six policy log-probs match an
    independent float64 derivation of SSO-SPEC §2 to 1e-6."""
    p = random_logps(32, seed=2, requires_grad=True)
    r = random_logps(32, seed=3)
    loss, _ = sso.sso_loss(p, r, beta=beta, alpha=alpha, theta=theta)
    expected = independent_sso_loss(p, r, beta, alpha, theta)[0]
    assert loss.shape == (32,)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    got, want = grads_of(loss, p), grads_of(expected, p)
    for key in sso.LOSS_KEYS:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
        assert bool((want[key] != 0).all()), key  # every key really is in the objective


def test_weight_gradient_flows_by_default_and_detach_removes_it():
    """By default W passes gradient into chosen/rejected, equal to θ·G·dW/dlogp with
    dW/dchosen = -α·W(1-W), dW/drejected = -(1-α)·W(1-W); with detach_weight=True
    the chosen/rejected gradient is exactly the IPO base term's gradient."""
    beta, alpha, theta = 0.2, 0.66, 0.1
    p = random_logps(16, seed=4, requires_grad=True)
    r = random_logps(16, seed=5)
    default = grads_of(sso.sso_loss(p, r, beta, alpha, theta)[0], p)
    detached = grads_of(sso.sso_loss(p, r, beta, alpha, theta, detach_weight=True)[0], p)

    base = sso.ipo_loss(p["chosen"], p["rejected"], r["chosen"], r["rejected"], beta)
    base_chosen, base_rejected = torch.autograd.grad(base.sum(), [p["chosen"], p["rejected"]])
    assert torch.equal(detached["chosen"], base_chosen)
    assert torch.equal(detached["rejected"], base_rejected)

    with torch.no_grad():
        _, _, steering, weight = independent_sso_loss(p, r, beta, alpha, theta)
        slope = weight * (1 - weight)
        extra_chosen = default["chosen"] - detached["chosen"]
        extra_rejected = default["rejected"] - detached["rejected"]
    torch.testing.assert_close(extra_chosen, theta * steering * (-alpha * slope), rtol=0, atol=1e-9)
    torch.testing.assert_close(extra_rejected, theta * steering * (-(1 - alpha) * slope), rtol=0, atol=1e-9)
    # Negative: a descent step raises pi~θ(y+|x) and pi~θ(y-|x), keeping samples on-policy.
    assert bool((extra_chosen < 0).all()) and bool((extra_rejected < 0).all())
    # Detaching W changes nothing else: the G keys see the same W value either way.
    for key in ("pos_chosen", "pos_rejected", "neg_original", "neg_chosen"):
        assert torch.equal(default[key], detached[key]), key


def test_ablation_without_weight():
    """use_weight=False is W := 1: loss = base + θ·G, the weight metric is all ones
    and chosen/rejected get only the base gradient."""
    beta, alpha, theta = 0.2, 0.66, 0.1
    p = random_logps(16, seed=6, requires_grad=True)
    r = random_logps(16, seed=7)
    loss, metrics = sso.sso_loss(p, r, beta, alpha, theta, use_weight=False)
    expected, base, steering, _ = independent_sso_loss(p, r, beta, alpha, theta, use_weight=False)
    torch.testing.assert_close(loss, base + theta * steering, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert torch.equal(metrics["weight"], torch.ones(16, dtype=torch.float64))
    grads = grads_of(loss, p)
    base_chosen, base_rejected = torch.autograd.grad(base.sum(), [p["chosen"], p["rejected"]])
    torch.testing.assert_close(grads["chosen"], base_chosen, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["rejected"], base_rejected, rtol=0, atol=1e-12)


def test_ablation_without_steering_loss():
    """theta=0 drops G: loss equals the base IPO loss and the x+/x- sequences get
    exactly zero gradient."""
    p = random_logps(16, seed=8, requires_grad=True)
    r = random_logps(16, seed=9)
    loss, metrics = sso.sso_loss(p, r, beta=0.2, alpha=0.66, theta=0.0)
    base = independent_sso_loss(p, r, 0.2, 0.66, 0.0)[1]
    torch.testing.assert_close(loss, base, rtol=0, atol=1e-12)
    assert torch.equal(loss.detach(), metrics["loss/base"])
    grads = grads_of(loss, p)
    for key in ("pos_chosen", "pos_rejected", "neg_original", "neg_chosen"):
        assert bool((grads[key] == 0).all()), key
    assert bool((grads["chosen"] != 0).all())


def test_metrics_keys_rewards_and_detachment():
    """Metrics hold every documented key, margins are β·((p_w−r_w)−(p_l−r_l)) for all
    three pairs, accuracies are 1 exactly where the policy improved the winner over
    the loser (a tie is not an improvement), and nothing carries gradient."""
    beta, batch = 0.2, 4
    gen = torch.Generator().manual_seed(10)
    r = {k: -3.0 + 2.0 * torch.rand(batch, generator=gen, dtype=torch.float64) for k in sso.LOSS_KEYS}
    patterns = {"rewards": [1, 0, 0, 1], "rewards_pos": [0, 1, 1, 0], "rewards_neg": [1, 1, 0, 0]}
    p, shifts = {}, {}
    for prefix, (winner, loser) in PAIRS.items():
        size = 0.05 + 0.4 * torch.rand(batch, generator=gen, dtype=torch.float64)
        sign = torch.tensor(patterns[prefix], dtype=torch.float64) * 2 - 1
        shifts[winner], shifts[loser] = sign * size, -sign * size / 2
        p[winner], p[loser] = r[winner] + shifts[winner], r[loser] + shifts[loser]
    p = {k: v.requires_grad_(True) for k, v in p.items()}

    loss, metrics = sso.sso_loss(p, r, beta=beta)
    expected_keys = {"loss", "loss/base", "loss/g_pos", "loss/g_neg", "weight"}
    expected_keys |= {f"{prefix}/{m}" for prefix in PAIRS for m in ("accuracies", "margins")}
    assert expected_keys <= set(metrics)
    for prefix, (winner, loser) in PAIRS.items():
        margins = beta * ((p[winner].detach() - r[winner]) - (p[loser].detach() - r[loser]))
        torch.testing.assert_close(metrics[f"{prefix}/margins"], margins, rtol=0, atol=1e-12)
        torch.testing.assert_close(metrics[f"{prefix}/margins"], beta * (shifts[winner] - shifts[loser]),
                                   rtol=0, atol=1e-12)
        accuracies = torch.tensor(patterns[prefix], dtype=metrics[f"{prefix}/accuracies"].dtype)
        assert torch.equal(metrics[f"{prefix}/accuracies"], accuracies), prefix
    assert loss.requires_grad
    assert torch.equal(metrics["loss"], loss.detach())
    for name, value in metrics.items():
        assert not value.requires_grad and value.grad_fn is None, name
        assert value.shape == (batch,), name
    _, at_reference = sso.sso_loss(r, r, beta=beta)
    for prefix in PAIRS:
        assert torch.equal(at_reference[f"{prefix}/margins"], torch.zeros(batch, dtype=torch.float64))
        assert torch.equal(at_reference[f"{prefix}/accuracies"], torch.zeros(batch, dtype=torch.float64))


@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer random Llama with a 64-token vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


# (prompt ids, response ids); the last one is the longest.
LOGP_SEQUENCES = [
    ([5, 17, 33], [8, 9]),
    ([10, 11], [12, 40, 14, 15, 61]),
    ([1, 2, 3, 4, 5, 6, 7], [7, 30]),
    ([50, 51, 52, 53, 54, 55, 56, 57], [20, 21, 22, 23, 24, 25, 26, 27]),
]


def naive_logp(model, prompt, response):
    """One unpadded sequence: full-vocabulary float32 log-softmax, mean over the response."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    logps = logits.float().log_softmax(-1)
    total = sum(logps[len(prompt) + i - 1, token].item() for i, token in enumerate(response))
    return total / len(response)


def pack(sequences, side, pad_id=0):
    """Pad (prompt, response) pairs on `side` into input_ids, attention and response masks."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        start = 0 if side == "right" else width - length
        input_ids[row, start:start + length] = torch.tensor(prompt + response)
        attention_mask[row, start:start + length] = 1
        response_mask[row, start + len(prompt):start + length] = 1
    return input_ids, attention_mask, response_mask


def test_sequence_logps_matches_naive_alone_and_padded(tiny_lm):
    """sequence_logps equals a naive per-sequence float32 log-softmax average, alone,
    batched with right padding, batched with left padding, and with tiny chunks."""
    model = tiny_lm
    naive = torch.tensor([naive_logp(model, p, r) for p, r in LOGP_SEQUENCES])
    with torch.no_grad():
        alone = torch.cat([sso.sequence_logps(model, *pack([seq], "right")) for seq in LOGP_SEQUENCES])
        right = sso.sequence_logps(model, *pack(LOGP_SEQUENCES, "right"))
        left = sso.sequence_logps(model, *pack(LOGP_SEQUENCES, "left", pad_id=63))
        chunked = sso.sequence_logps(model, *pack(LOGP_SEQUENCES, "left", pad_id=63), chunk_size=3)
    assert right.dtype == torch.float32 and right.shape == (len(LOGP_SEQUENCES),)
    torch.testing.assert_close(alone, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(right, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, left, rtol=0, atol=1e-6)
    # The response mask matters: averaging prompt tokens too would give other values.
    ids, attention, _ = pack(LOGP_SEQUENCES, "right")
    with torch.no_grad():
        whole = sso.sequence_logps(model, ids, attention, attention)
    assert not torch.allclose(whole, naive, rtol=0, atol=1e-3)


def test_sequence_logps_backpropagates(tiny_lm):
    """Backward through sequence_logps reaches every model weight with finite, non-zero gradients."""
    model = tiny_lm
    params = [param for param in model.parameters() if param.requires_grad]
    out = sso.sequence_logps(model, *pack(LOGP_SEQUENCES, "left"))
    grads = torch.autograd.grad(out.sum(), params)
    assert len(grads) > 0
    for param, grad in zip(params, grads):
        assert grad.shape == param.shape
        assert bool(torch.isfinite(grad).all())
        assert bool((grad != 0).any())  # every weight of the tiny model shapes the log-probs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_functions_keep_input_precision(dtype):
    """ipo_loss, steering_weight and sso_loss give finite results in the input dtype or
    wider, close to the float64 values of the same inputs."""
    p = random_logps(8, seed=11, dtype=dtype)
    r = random_logps(8, seed=12, dtype=dtype)
    p64 = {k: v.double() for k, v in p.items()}
    r64 = {k: v.double() for k, v in r.items()}
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-5

    def check(result, want):
        assert result.dtype == torch.promote_types(result.dtype, dtype), result.dtype
        assert bool(torch.isfinite(result).all())
        torch.testing.assert_close(result.double(), want, rtol=tolerance, atol=tolerance)

    check(sso.ipo_loss(p["chosen"], p["rejected"], r["chosen"], r["rejected"], 0.2),
          sso.ipo_loss(p64["chosen"], p64["rejected"], r64["chosen"], r64["rejected"], 0.2))
    check(sso.steering_weight(p["chosen"], p["rejected"], 0.66),
          sso.steering_weight(p64["chosen"], p64["rejected"], 0.66))
    loss, metrics = sso.sso_loss(p, r)
    loss64, metrics64 = sso.sso_loss(p64, r64)
    check(loss, loss64)
    for name, value in metrics.items():
        check(value, metrics64[name])


# ---- the SSO loop (SSO-SPEC §4-7) ----

TINY_RUN = ["--iterations", "1", "--prompts-per-iteration", "4", "--max-new-tokens", "8", "--seed", "0"]


@pytest.fixture(scope="session")
def smollm_dir():
    """The offline default model, converted once into the user's cache (as sso.py does)."""
    return sso.convert_gguf(sso.default_gguf())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_sso(*argv):
    """sso.main in this process; returns its exit code."""
    return sso.main([str(a) for a in argv])


def last_line(stream):
    """The last line a process printed; progress bars redraw with carriage returns."""
    return re.split(r"[\r\n]+", stream.strip())[-1]


def lora_tensors(adapter_dir):
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def test_one_iteration_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    """Outputs exist and are readable by PEFT, LoRA moved, and the first step starts at the reference."""
    out = tmp_path / "run"
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN) == 0
    adapter = out / "iter-1" / "adapter"
    assert str(adapter) in capsys.readouterr().out
    lora_b = [t for name, t in lora_tensors(adapter).items() if "lora_B" in name]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b), "LoRA B starts at zero and must have moved"

    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), adapter)
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())

    triples = [json.loads(line) for line in (out / "iter-1" / "triples.jsonl").read_text().splitlines()]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["iteration"] == 1 and record["triples"] == len(triples) > 0
    assert record["triples"] + sum(record["dropped"].values()) == 4
    assert set(triples[0]) >= {"prompt", "chosen", "rejected", "original", "features", "pos_system", "neg_system"}
    assert set(triples[0]["ref_logps"]) == set(sso.REFERENCE_KEYS)

    first = json.loads((out / "iter-1" / "steps.jsonl").read_text().splitlines()[0])
    target = (1 / (2 * 0.2)) ** 2  # policy == reference at the first step, so h = 0
    for term in ("loss/base", "loss/g_pos", "loss/g_neg"):
        assert first[term] == pytest.approx(target, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_default_model_runs_from_the_command_line(tmp_path):
    """`python sso.py` on the offline SmolLM2-135M, shortened to a few tokens."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(HERE / "sso.py"), "--output-dir", str(out), "--iterations", "1",
                             "--prompts-per-iteration", "2", "--max-new-tokens", "6"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"adapter: {out / 'iter-1' / 'adapter'}" in result.stdout
    assert (out / "iter-1" / "adapter" / "adapter_model.safetensors").is_file()


def test_4bit_path_on_cpu(tiny_model_dir, tmp_path):
    """--load-in-4bit puts nf4 weights under LoRA, and a whole iteration runs on them."""
    import bitsandbytes as bnb

    args = sso.parse_args(["--model", str(tiny_model_dir), "--load-in-4bit"])
    _, model = sso.load_policy(args, Accelerator())
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and quantized[0].weight.quant_type == "nf4"
    out = tmp_path / "run"
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, "--load-in-4bit", *TINY_RUN) == 0
    assert json.loads((out / "run.json").read_text())["load_in_4bit"] is True
    assert (out / "iter-1" / "adapter" / "adapter_model.safetensors").is_file()


def test_4bit_gradients_survive_generation(tiny_model_dir):
    """On CPU, bitsandbytes would repack 4-bit weights during an eval pass into a layout
    without backward; sso.py keeps the trainable layout, so LoRA gradients are unchanged."""
    args = sso.parse_args(["--model", str(tiny_model_dir), "--load-in-4bit", "--lora-dropout", "0"])
    _, model = sso.load_policy(args, Accelerator())
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # nonzero B so that every LoRA matrix gets a gradient
            torch.nn.init.normal_(param, std=0.1)
    input_ids = torch.randint(0, 1000, (2, 12))
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 6:] = 1

    def lora_grads():
        model.train()
        model.zero_grad()
        sso.sequence_logps(model, input_ids, torch.ones_like(input_ids), response_mask).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    after = lora_grads()
    assert all(before[n].abs().sum() > 0 for n in before)
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)


def test_gradient_checkpointing_keeps_the_gradients(tiny_model_dir):
    """Recomputing activations in backward gives the same LoRA gradients, LoRA
    dropout included (the recompute replays the same random numbers)."""
    input_ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 6:] = 1

    def lora_grads(*flags):
        args = sso.parse_args(["--model", str(tiny_model_dir), "--lora-dropout", "0.3", *flags])
        torch.manual_seed(0)
        _, model = sso.load_policy(args, Accelerator())
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero B so that every LoRA matrix gets a gradient
                torch.nn.init.normal_(param, std=0.1)
        model.train()
        torch.manual_seed(1)
        sso.sequence_logps(model, input_ids, torch.ones_like(input_ids), response_mask).sum().backward()
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert checkpointing == bool(flags), "checkpointing should be on exactly when asked"
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(), lora_grads("--gradient-checkpointing")
    assert plain.keys() == checkpointed.keys() and all(plain[n].abs().sum() > 0 for n in plain)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_benchmark_script_runs_on_a_small_shape():
    """benchmarks/train_step.py (the GPU measurement) still runs: sso.py's step on a
    small random Llama, 4-bit with checkpointing, printing its numbers as JSON."""
    result = subprocess.run([sys.executable, str(HERE / "benchmarks" / "train_step.py"), "--layers", "1",
                             "--hidden-size", "128", "--intermediate-size", "256", "--vocab-size", "512",
                             "--seq-len", "32", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout)
    assert numbers["sequences_per_step"] == 6 and numbers["load_in_4bit"] and numbers["gradient_checkpointing"]
    assert numbers["seconds_per_step"] > 0 and math.isfinite(numbers["loss"])
    # LoRA r=16 on one layer's q, k, v, o (128 -> 128 with one head of 128) and
    # gate, up, down (128 <-> 256): r * (in + out) each, the LM head left out.
    assert numbers["lora_parameters"] == 16 * (4 * (128 + 128) + 3 * (128 + 256))


CHOICES = ["Safety", "Logicality", "Accuracy", "Helpfulness"]


@pytest.mark.parametrize("answer, expected", [
    ("Safety, Accuracy", ["Safety", "Accuracy"]),
    ("Qualities: accuracy and maybe Banana", ["Accuracy"]),
    ("Safety, safety, SAFETY, Logicality", ["Safety", "Logicality"]),
    ("Helpfulness, Accuracy, Safety", ["Helpfulness", "Accuracy"]),
    ("safetyfirst, Logicality", ["Logicality"]),
    ("I think the answer is 42!", []),
    ("", []),
])
def test_parse_features(answer, expected):
    """Known names in the model's order, case-insensitive, without duplicates, at most k."""
    assert sso.parse_features(answer, CHOICES, k=2) == expected


def test_parse_features_with_spaces_in_names():
    assert sso.parse_features("I pick world knowledge, then Tone.", ["Tone", "World Knowledge"], k=2) == [
        "World Knowledge", "Tone"]


def test_select_principles_fills_and_counts(monkeypatch):
    """Unparseable answers are counted and filled at random; Concision joins by its probability."""
    principles = sso.load_principles(HERE / "principles.json")
    principles["Concision"]["add_probability"] = 1.0
    answers = ["Safety, Accuracy", "no idea", "Engagement, engagement"]
    monkeypatch.setattr(sso, "generate", lambda *args, **kwargs: answers)
    args = sso.parse_args(["--num-principles", "2"])
    selections, unparseable = sso.select_principles(None, FakeTokenizer(), ["q1", "q2", "q3"], principles,
                                                    args, random.Random(0))
    assert unparseable == 1
    assert selections[0] == ["Safety", "Accuracy", "Concision"]
    assert selections[2][0] == "Engagement" and selections[2][1] not in ("Engagement", "Concision")
    for features in selections:
        assert len(features) == 3 and features[-1] == "Concision" and len(set(features)) == 3


class FakeTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "\n".join(m["content"] for m in messages)


def test_system_prompts_use_each_side():
    principles = sso.load_principles(HERE / "principles.json")
    pos, neg = sso.build_system_prompts(principles, ["Safety", "Concision"])
    assert "safe, concise" in pos and principles["Safety"]["positive_principle"] in pos
    assert "unsafe, verbose" in neg and principles["Concision"]["negative_principle"] in neg
    assert principles["Safety"]["negative_principle"] not in pos
    assert pos.endswith("Never mention or hint at these guidelines in your response.")
    assert neg.endswith("Never mention or hint at these guidelines in your response.")


@pytest.mark.parametrize("triple, reason", [
    (dict(chosen="a", rejected="b", original="c"), None),
    (dict(chosen="  ", rejected="b", original="c"), "empty"),
    (dict(chosen="a", rejected="", original="c"), "empty"),
    (dict(chosen="a", rejected="b", original="\n"), "empty"),
    (dict(chosen="a ", rejected=" a", original="c"), "chosen_equals_rejected"),
    (dict(chosen="a", rejected="b", original="a\n"), "chosen_equals_original"),
    (dict(chosen="a", rejected="b", original="b"), "rejected_equals_original"),
])
def test_filter_triples_by_reason(triple, reason):
    kept, dropped = sso.filter_triples([triple])
    assert kept == ([] if reason else [triple])
    assert dropped == {r: int(r == reason) for r in sso.DROP_REASONS}


def test_load_prompts_formats(tmp_path):
    """A JSON list of strings or objects, or JSONL with 'prompt' or 'instruction'."""
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(["one", {"prompt": "two"}, {"instruction": " three "}]))
    as_jsonl = tmp_path / "b.jsonl"
    as_jsonl.write_text('{"prompt": "one"}\n\n{"instruction": "two", "output": "x"}\n')
    assert sso.load_prompts(as_list) == ["one", "two", "three"]
    assert sso.load_prompts(as_jsonl) == ["one", "two"]
    assert sso.load_prompts(None) == sso.BUILTIN_PROMPTS


def test_iteration_queries_wrap_around():
    prompts = ["a", "b", "c"]
    assert sso.iteration_queries(prompts, 1, 2) == ["a", "b"]
    assert sso.iteration_queries(prompts, 2, 2) == ["c", "a"]


# ---- errors, resume and atomic outputs ----


def write(path, text):
    path.write_text(text)
    return path


BAD_INPUT = [
    (lambda d: ["--prompts", d / "missing.json"], "cannot read prompts file"),
    (lambda d: ["--prompts", d], "cannot read prompts file"),
    (lambda d: ["--prompts", write(d / "p.json", "[1, 2")], "not valid JSON or JSONL"),
    (lambda d: ["--prompts", write(d / "p.jsonl", '{"prompt": "a"}\n{oops\n')], "not valid JSON or JSONL"),
    (lambda d: ["--prompts", write(d / "p.json", "[]")], "the prompt set is empty"),
    (lambda d: ["--prompts", write(d / "p.jsonl", "\n")], "the prompt set is empty"),
    (lambda d: ["--prompts", write(d / "p.json", '[{"text": "a"}]')], "item 1 has no usable text"),
    (lambda d: ["--prompts", write(d / "p.json", '["a", "  "]')], "item 2 has no usable text"),
    (lambda d: ["--principles", write(d / "pr.json", "{")], "malformed JSON in principles file"),
    (lambda d: ["--principles", write(d / "pr.json", "[]")], "expected a non-empty JSON object"),
    (lambda d: ["--principles", write(d / "pr.json", '{"Safety": {"positive": "Safe"}}')],
     "feature 'Safety' lacks the text field 'negative'"),
    (lambda d: ["--features", "Safety,Kindness"], "unknown feature(s) Kindness"),
    (lambda d: ["--features", "Concision"], "no feature is left for the model to choose from"),
    (lambda d: ["--model", d / "no-such-model"], "no such folder"),
    (lambda d: ["--model", d / "no-such.gguf"], "no such file"),
    (lambda d: ["--model", d], "cannot load model"),
    (lambda d: ["--beta", "0"], "--beta must be > 0"),
    (lambda d: ["--beta", "high"], "argument --beta: invalid float value: 'high'"),
    (lambda d: ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (lambda d: ["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (lambda d: ["--theta", "-0.1"], "--theta must be >= 0"),
    (lambda d: ["--iterations", "0"], "--iterations must be >= 1"),
    (lambda d: ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (lambda d: ["--batch-size", "0"], "--batch-size must be >= 1"),
    (lambda d: ["--resume", "--overwrite"], "exclude each other"),
]


@pytest.mark.parametrize("make_argv, message", BAD_INPUT)
def test_bad_input_is_one_clear_line(make_argv, message, tmp_path, capsys):
    """Exit code 2, one line naming the problem, no traceback, nothing written."""
    out = tmp_path / "run"
    assert run_sso(*make_argv(tmp_path), "--output-dir", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sso.py: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_model_without_chat_template(tiny_model_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    assert run_sso("--model", plain, "--output-dir", tmp_path / "run") == 2
    expected = f"sso.py: error: model {plain} has no chat template; SSO needs a chat model"
    assert last_line(capsys.readouterr().err) == expected


def test_4bit_without_bitsandbytes(monkeypatch, tmp_path, tiny_model_dir, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    assert run_sso("--model", tiny_model_dir, "--load-in-4bit", "--output-dir", tmp_path / "run") == 2
    assert "--load-in-4bit needs bitsandbytes" in capsys.readouterr().err


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"),
                                             ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                             ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_sharded_launch_is_refused(variable, name, monkeypatch, tmp_path, capsys):
    """`accelerate launch --use_fsdp` (or a config file asking for it) sets these
    variables; sso.py stops before loading anything instead of hanging later."""
    monkeypatch.setenv(variable, "true")
    out = tmp_path / "run"
    assert run_sso("--output-dir", out) == 2
    assert capsys.readouterr().err == (f"sso.py: error: {name} is not supported; launch with --multi_gpu "
                                       "(DDP, one model copy per GPU) as in the README's 'Several GPUs'\n")
    assert not out.exists()
    monkeypatch.setenv(variable, "false")
    sso.check_launch()  # only "true" (or 1, yes) asks for sharding


def test_existing_run_is_never_clobbered(tiny_model_dir, tmp_path, capsys):
    """A second run into the same folder is refused without --resume or --overwrite, and
    --resume refuses changed settings; the first run's files stay byte for byte."""
    out = tmp_path / "run"
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN, "--resume", "--beta", "0.5") == 2
    assert "other settings: beta (0.2 -> 0.5)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN, "--overwrite", "--seed", "1") == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 1


def test_non_finite_loss_keeps_last_good_iteration(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN) == 0
    good = lora_tensors(out / "iter-1" / "adapter")
    real_loss = sso.sso_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(sso, "sso_loss", nan_loss)
    capsys.readouterr()
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN, "--iterations", "2", "--resume") == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith("sso.py: error: non-finite loss at iteration 2, micro-step 1")
    assert not (out / "iter-2").exists()
    kept = lora_tensors(out / "iter-1" / "adapter")
    assert all(torch.equal(good[name], kept[name]) for name in good)


def test_all_filtered_iteration_is_skipped(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """When every triple is dropped the iteration is reported, kept resumable, and nothing trains."""
    monkeypatch.setattr(sso, "generate", lambda model, tokenizer, prompts, *a, **k: ["same"] * len(prompts))
    out = tmp_path / "run"
    assert run_sso("--model", tiny_model_dir, "--output-dir", out, *TINY_RUN) == 0
    assert "every triple was filtered out" in capsys.readouterr().out
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["skipped"] and record["triples"] == 0 and record["dropped"]["chosen_equals_rejected"] == 4
    assert all(t.abs().max() == 0 for name, t in lora_tensors(out / "iter-1" / "adapter").items() if "lora_B" in name)


def start_run(model_dir, out, *extra):
    return subprocess.Popen([sys.executable, str(HERE / "sso.py"), "--model", str(model_dir), "--output-dir", str(out),
                             "--iterations", "2", "--prompts-per-iteration", "4", "--max-new-tokens", "24",
                             "--seed", "3", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_during_iteration_2(process, out, sig):
    """Wait until iteration 1 is complete, then send `sig` while iteration 2 runs."""
    deadline = time.time() + 240
    while not (out / "iter-1").is_dir():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert not (out / "iter-2").exists(), "the signal came too late to test anything"
    return process.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    process = start_run(tiny_model_dir, out)
    assert process.wait(timeout=300) == 0, process.communicate()[1][-2000:]
    return out


def test_crash_then_resume_gives_the_same_adapter(tiny_model_dir, tmp_path, uninterrupted):
    """A SIGKILL mid-iteration loses only that iteration; --resume ends where an
    uninterrupted run with the same seed ends, weight for weight."""
    out = tmp_path / "run"
    returncode, _ = stop_during_iteration_2(start_run(tiny_model_dir, out), out, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    (out / "iter-2.tmp").mkdir()  # as if the crash hit while iteration 2 was being saved
    metrics = out / "metrics.jsonl"
    metrics.write_text("")  # as if it hit between the rename and the metrics line
    resumed = start_run(tiny_model_dir, out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    assert "resuming after iteration 1 of 2" in resumed.communicate()[0]
    assert not (out / "iter-2.tmp").exists()
    expected, actual = lora_tensors(uninterrupted / "iter-2" / "adapter"), lora_tensors(out / "iter-2" / "adapter")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()] == [1, 2]
    for name in ("triples.jsonl", "steps.jsonl"):
        assert (out / "iter-2" / name).read_text() == (uninterrupted / "iter-2" / name).read_text()


def test_ctrl_c_keeps_completed_iterations(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    returncode, err = stop_during_iteration_2(start_run(tiny_model_dir, out), out, signal.SIGINT)
    assert returncode == 130
    assert last_line(err) == ("sso.py: interrupted; completed iterations are kept, "
                                            "continue with --resume")
    assert (out / "iter-1" / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_cosine_schedule_matches_transformers():
    """Our written-out schedule gives the learning rates of transformers' own."""
    from transformers import get_cosine_schedule_with_warmup

    def rates(make_schedule):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        schedule, seen = make_schedule(optimizer), []
        for _ in range(25):
            seen.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return seen

    ours = rates(lambda opt: sso.cosine_with_warmup(opt, 2, 25))
    assert ours == pytest.approx(rates(lambda opt: get_cosine_schedule_with_warmup(opt, 2, 25)), abs=1e-12)
    assert ours[:3] == pytest.approx([0.0, 0.05, 0.1]) and ours[-1] < 0.001


def test_write_atomic_replaces_whole_file(tmp_path):
    target = write(tmp_path / "f.json", "old")
    sso.write_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# ---- several processes with accelerate ----

# Run by each process: sso.py's own main(), plus a dump of this process's LoRA
# weights after every iteration, so the test can compare the processes.
DRIVER = '''
import json
import sys
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

import sso

dump_dir = Path(sys.argv.pop(1))
run_iteration = sso.run_iteration


def run_iteration_and_dump(t, model, *rest):
    result = run_iteration(t, model, *rest)
    accelerator = rest[-1]
    peft_model = accelerator.unwrap_model(model)
    name = dump_dir / f"iter-{t}-rank-{accelerator.process_index}"
    save_file(get_peft_model_state_dict(peft_model), f"{name}.safetensors")
    layers = {type(module).__name__ for module in peft_model.modules()}
    checkpointing = any(getattr(module, "gradient_checkpointing", False) for module in peft_model.modules())
    Path(f"{name}.json").write_text(json.dumps({"linear4bit": "Linear4bit" in layers,
                                                "checkpointing": checkpointing}))
    return result


sso.run_iteration = run_iteration_and_dump
sys.exit(sso.main())
'''


def launch_two_processes(script, script_args, tmp_path):
    """`accelerate launch` with two processes on the CPU. `--cpu` would start only one
    process (accelerate needs mpirun for several); `--multi_gpu` starts them with
    torchrun, and sso.py, seeing no CUDA, joins them in a gloo group."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(sso.__file__).parent),
                                                       os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": "",            # CPU processes even on a GPU machine
           "HF_HOME": str(tmp_path / "hf-home"),  # ignore any accelerate default_config.yaml
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0",  # a free port: parallel test runs do not collide
               str(script), *script_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--load-in-4bit", "--gradient-checkpointing"]], ids=["fp32", "4bit-ckpt"])
def test_two_processes_share_one_run(tiny_model_dir, tmp_path, extra):
    """accelerate launch with 2 processes, in float32 and in 4-bit with gradient
    checkpointing: shards sampled apart, one set of outputs, identical LoRA
    weights on both, metrics over all triples."""
    out, dump_dir, driver = tmp_path / "run", tmp_path / "weights", tmp_path / "driver.py"
    dump_dir.mkdir()
    driver.write_text(DRIVER)
    result = launch_two_processes(driver, [str(dump_dir), "--model", str(tiny_model_dir), "--iterations", "1",
                                           "--prompts-per-iteration", "4", "--max-new-tokens", "8",
                                           "--output-dir", str(out), *extra], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    # Only the main process writes: one adapter, one metrics line, one summary, one set of bars.
    adapter = out / "iter-1" / "adapter" / "adapter_model.safetensors"
    assert list(out.rglob("adapter_model.safetensors")) == [adapter]
    assert not list(out.glob("*.tmp"))
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.stdout.count("iteration 1: ") == 1
    for bar in ("sampling y+, y-, y°", "reference log-probs", "training iteration 1"):
        assert len(re.findall(rf"{re.escape(bar)}: +0%", result.stderr)) == 1, bar

    # Each process trained its own 4-bit copy with checkpointing when asked.
    for rank in (0, 1):
        layout = json.loads((dump_dir / f"iter-1-rank-{rank}.json").read_text())
        assert layout == {"linear4bit": bool(extra), "checkpointing": bool(extra)}

    # Synchronized gradients: both processes end with the same, trained LoRA weights.
    rank0, rank1 = (load_file(dump_dir / f"iter-1-rank-{rank}.safetensors") for rank in (0, 1))
    saved = load_file(adapter)
    assert rank0.keys() == rank1.keys() == saved.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the processes"
        assert torch.equal(rank0[name], saved[name]), f"{name} differs from the saved adapter"
    assert any(rank0[name].abs().sum() > 0 for name in rank0 if "lora_B" in name), "LoRA B is still zero"

    # Each process sampled its own shard, and the output holds both shards.
    triples = [json.loads(line) for line in (out / "iter-1" / "triples.jsonl").read_text().splitlines()]
    queries = sso.iteration_queries(sso.load_prompts(None), 1, 4)
    prompts = {triple["prompt"] for triple in triples}
    for rank in (0, 1):
        assert prompts & set(queries[rank::2]), f"no triple from process {rank}'s shard"

    # Metrics cover all processes: every query is counted once, kept or dropped.
    assert record["triples"] == len(triples)
    assert record["triples"] + sum(record["dropped"].values()) == len(queries)
    assert 0 <= record["selection_unparseable"] <= len(queries)
    steps = [json.loads(line) for line in (out / "iter-1" / "steps.jsonl").read_text().splitlines()]
    assert sum(step["examples"] for step in steps) == len(triples)
