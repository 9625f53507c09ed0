"""Opens what `glm4` wrote with the Python stack and prints what it sees, as JSON.

Used by the Rust tests (tests/sft_cli.rs) to check that our outputs are the
ones Python users open:

  peft BASE ADAPTER PROMPT N   load BASE with transformers, the adapter with
                               PeftModel.from_pretrained; report missing /
                               unexpected keys and the greedy ids for PROMPT
  hf MODEL PROMPT N            load a (merged) checkpoint with transformers and
                               report the greedy ids for PROMPT
  state FILE                   parse a trainer_state.json with transformers'
                               TrainerState.load_from_json
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def greedy(model, tokenizer, prompt, n):
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def main():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cmd = sys.argv[1]
    if cmd == "peft":
        from peft import PeftModel
        from peft.utils import load_peft_weights

        base_dir, adapter_dir, prompt, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, adapter_dir)
        # What PEFT would report as missing/unexpected when loading the state dict.
        weights = load_peft_weights(adapter_dir)
        expected = {k.replace(".default", "") for k in model.state_dict() if "lora_" in k}
        got = set(weights)
        print(json.dumps({
            "missing": sorted(expected - got),
            "unexpected": sorted(got - expected),
            "ids": greedy(model, tokenizer, prompt, n),
        }))
    elif cmd == "hf":
        model_dir, prompt, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        print(json.dumps({"ids": greedy(model, tokenizer, prompt, n)}))
    elif cmd == "state":
        from transformers import TrainerState

        state = TrainerState.load_from_json(sys.argv[2])
        print(json.dumps({"global_step": state.global_step, "log_history": len(state.log_history),
                          "best_metric": state.best_metric}))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
