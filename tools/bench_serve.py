"""What KV-prefix reuse saves a conversation on a running `flashlm serve`, measured by the server.

    flashlm serve [MODEL] --port 8080 &
    python tools/bench_serve.py --url http://127.0.0.1:8080/v1 [--turns 4] [--reps 3]

Each turn of one conversation is sent twice, alternating: right after the previous turn (the server's
KV cache holds the conversation, so only the new tokens run) and after an unrelated request has
replaced the cache (the whole prompt runs). Prints per turn the prompt length, the tokens actually
run, and the median server-side prompt time and time to first token of both (the response's
`timings`, so network and client overhead are excluded). Greedy decoding, so both see the same text.
"""
from __future__ import annotations

import argparse
import statistics

from openai import OpenAI

SYSTEM = ("You are a careful assistant. Answer in one or two sentences, plainly, without lists. "
          "If a question is ambiguous, say which reading you answer.")
QUESTIONS = ["What is the capital of France?", "And how many people live there?",
             "Name one museum there.", "What is it best known for?", "When was it founded?",
             "Is it open on Mondays?"]


def ask(client, messages, max_tokens):
    r = client.chat.completions.create(model="flashlm", messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.usage, r.model_extra["timings"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    client = OpenAI(base_url=args.url, api_key="none", max_retries=0, timeout=600)
    unrelated = [{"role": "user", "content": "Say something about the weather."}]
    messages = [{"role": "system", "content": SYSTEM}]
    print("| turn | prompt tokens | run with reuse | run without | prompt ms with / without | TTFT ms with / without |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        warm, cold = [], []
        for _ in range(args.reps):
            ask(client, messages[:-1] if turn else messages, 1)       # the cache holds the previous turn
            warm.append(ask(client, messages, args.max_tokens))
            ask(client, unrelated, 1)                                  # the cache holds something else
            cold.append(ask(client, messages, args.max_tokens))
        assert all(w[0] == c[0] for w, c in zip(warm, cold)), "reuse changed the reply"
        med = lambda runs, key: statistics.median(t[key] for _, _, t in runs)   # noqa: E731
        print(f"| {turn + 1} | {warm[0][1].prompt_tokens} | {warm[0][2]['prompt_n']} | {cold[0][2]['prompt_n']} "
              f"| {med(warm, 'prompt_ms'):.1f} / {med(cold, 'prompt_ms'):.1f} "
              f"| {med(warm, 'ttft_ms'):.1f} / {med(cold, 'ttft_ms'):.1f} |")
        messages.append({"role": "assistant", "content": warm[0][0]})


if __name__ == "__main__":
    main()
