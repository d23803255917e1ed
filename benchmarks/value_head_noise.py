"""How noisy a PPO critic is before it has learned anything: the per-token values of a freshly initialised scalar
head on the embedded policy, against the spread of the task reward on the same completions.

PPO without a reward model starts its value model from the policy with a fresh ``hidden -> 1`` head. Its values
enter every advantage through GAE's temporal differences ``delta_t = r_t + V(s_{t+1}) - V(s_t)``. This prints how
wide they spread against the reward (benchmarks/README.md, "PPO's fresh value head"). Usage::

    python benchmarks/value_head_noise.py PAIRS.jsonl [--pairs 8]

``PAIRS.jsonl``: preference pairs with ``score_chosen`` / ``score_rejected`` (``compare``'s ``pairs.jsonl``).
"""

from __future__ import annotations

import argparse
import json

import torch

from alignlab.models import load_reward_model, load_tokenizer


def text_of(value) -> str:
    return value[-1]["content"] if isinstance(value, list) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs")
    parser.add_argument("--pairs", dest="n", type=int, default=8)
    args = parser.parse_args()
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = load_reward_model(None, pad_token_id=tok.pad_token_id).eval()
    rows = [json.loads(line) for line in open(args.pairs, encoding="utf-8") if line.strip()][: args.n]
    values, scores = [], []
    for row in rows:
        prompt = row["prompt"]
        prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) \
            if isinstance(prompt, list) else prompt
        for key in ("chosen", "rejected"):
            completion = text_of(row[key])
            ids = tok(prompt + completion, return_tensors="pt").input_ids
            with torch.no_grad():
                v = model.score(model.model(input_ids=ids).last_hidden_state).squeeze(-1)[0]
            n = len(tok(completion).input_ids)
            values.append(v[-n - 1 : -1])  # V(s_t) for each completion token: the head at the position before it
            scores.append(row[f"score_{key}"])
    v, s = torch.cat(values), torch.tensor(scores)
    td = torch.cat([x[1:] - x[:-1] for x in values])
    print(f"{len(scores)} completions, {v.numel()} tokens")
    print(f"fresh value head: per-token value mean {v.mean():.3f}, std {v.std():.3f}; "
          f"V(s_t+1) - V(s_t) std {td.std():.3f}")
    print(f"task reward: mean {s.mean():.3f}, std {s.std():.3f}")


if __name__ == "__main__":
    main()
