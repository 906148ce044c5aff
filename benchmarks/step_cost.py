"""Cost of one verification pass of n tree nodes on this machine, relative to one AR step.

    python benchmarks/step_cost.py [--model DIR] [--threads 2] [--prefix 128] [--repeats 30]

Prints, for n in 1, 4, 8, 16, 32, 64, 128: the engine's verification pass (vadusa.cost.verify_pass:
4D tree mask, position ids, pre-allocated cache), a bare `model(...)` forward of the same n tokens on a
DynamicCache with transformers' own causal mask, their ratio (the engine's overhead), and the engine's
pass on a copy of the model with `vadusa.transpose_linear_weights` (the CPU layout the demo pipeline
uses), all interleaved round by round and reported as medians; "x AR step" divides by the same layout's
1-token pass. Without --model it uses the shipped demo LM if present, else a random 4-layer 256-wide Llama.
"""

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from vadusa.cost import interleaved_medians, verify_pass
from vadusa.cpu import transpose_linear_weights

DEMO_LM = Path(__file__).resolve().parents[1] / "vadusa" / "assets" / "demo" / "lm"


def bare_forward(model, n: int, prefix_len: int):
    """A closure running a plain `model(...)` forward of n tokens on a DynamicCache, then cropping it back."""
    vocab = model.get_output_embeddings().weight.shape[0]
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, vocab, (1, prefix_len)), past_key_values=cache, use_cache=True)
    tokens = torch.randint(0, vocab, (1, n))

    @torch.no_grad()
    def run():
        model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-n)

    return run


def load_model(path: str | None):
    if path:
        return AutoModelForCausalLM.from_pretrained(path).eval(), path
    if (DEMO_LM / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(DEMO_LM).eval(), "demo LM"
    config = LlamaConfig(
        vocab_size=700,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).eval(), "random Llama 4x256"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers causal LM directory (default: demo LM)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prefix", type=int, default=128, help="cached prefix length")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, name = load_model(args.model)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{name}: {params:.1f}M params, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"prefix {args.prefix}"
    )
    print("nodes | engine verify ms | x AR step | bare forward ms | engine / bare | transposed ms | x AR step")
    sizes = (1, 4, 8, 16, 32, 64, 128)
    transposed = transpose_linear_weights(copy.deepcopy(model))
    fns = {("engine", n): verify_pass(model, n, args.prefix) for n in sizes}
    fns |= {("bare", n): bare_forward(model, n, args.prefix) for n in sizes}
    fns |= {("transposed", n): verify_pass(transposed, n, args.prefix) for n in sizes}
    t = interleaved_medians(fns, args.repeats)
    for n in sizes:
        engine, bare, moved = t[("engine", n)], t[("bare", n)], t[("transposed", n)]
        ar, moved_ar = t[("engine", 1)], t[("transposed", 1)]
        print(
            f"{n:5d} | {engine * 1e3:16.2f} | {engine / ar:9.2f} | {bare * 1e3:15.2f} | {engine / bare:13.2f} | "
            f"{moved * 1e3:13.2f} | {moved / moved_ar:9.2f}"
        )


if __name__ == "__main__":
    main()
