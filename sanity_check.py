"""The assignment's sanity check: stories42M's logits and hidden states on fixed token ids, against
reference/sanity_check.data (atol 1e-5, rtol 1e-3).

That reference was computed WITHOUT a causal mask: its hidden states at position 0 differ between the two
sequences although both start with token 101, which causal attention cannot produce. minLlama2 is causal (as
llama2.c trains and transformers computes, and as a key/value cache requires), so this check runs the model
in its explicit non-causal compatibility mode, causal=False, and says so. Nothing else uses that mode.
"""
import argparse
import os
import sys
from typing import Optional

import torch

from llama import load_pretrained
from utils import UsageError, load_tensors

CHECKPOINT = "stories42M.pt"
REFERENCE = "sanity_check.data"
# "hello world" and "hello neural network for NLP" as the assignment tokenized them, right-padded with 0
SENT_IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0],
                         [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])


def main(argv: Optional[list[str]] = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            usage="python sanity_check.py  (from the repo root, after ./setup.sh)").parse_args(argv)
    for path in (CHECKPOINT, REFERENCE):
        if not os.path.isfile(path):
            print(f"sanity_check: {path} is missing; run ./setup.sh (it downloads {CHECKPOINT}, 167 MB, "
                  f"and copies {REFERENCE})", file=sys.stderr)
            return 2
    torch.manual_seed(1337)
    try:
        reference = load_tensors(REFERENCE, "reference", "run ./setup.sh to copy it again")
        if not (isinstance(reference, dict) and {"logits", "hidden_states"} <= reference.keys()):
            raise UsageError(f"reference {REFERENCE}: no logits and hidden_states in it; run ./setup.sh to copy it "
                             f"again")
        llama = load_pretrained(CHECKPOINT).eval()
    except UsageError as e:
        print(f"sanity_check: {e}", file=sys.stderr)
        return 2
    print("Running the non-causal compatibility mode: the reference outputs were computed without a causal mask.")
    with torch.no_grad():
        logits, hidden_states = llama(SENT_IDS, causal=False)
    ok_logits = torch.allclose(logits, reference["logits"], atol=1e-5, rtol=1e-3)
    ok_hidden = torch.allclose(hidden_states, reference["hidden_states"], atol=1e-5, rtol=1e-3)
    print(f"logits: {'match' if ok_logits else 'DIFFER'} (max abs diff "
          f"{(logits - reference['logits']).abs().max():.2e}); hidden states: {'match' if ok_hidden else 'DIFFER'} "
          f"(max abs diff {(hidden_states - reference['hidden_states']).abs().max():.2e})")
    if ok_logits and ok_hidden:
        print("Your Llama implementation is correct!")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
