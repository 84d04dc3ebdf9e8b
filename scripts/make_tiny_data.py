"""Writes dspark_jax/assets/tiny_conversations.jsonl: the embedded training set of the ``tiny`` presets.

Templated, highly regular conversations (arithmetic, counting, spelling, repetition), so a small target trained
from scratch on CPU learns them in a few hundred steps and a draft has a peaked distribution to imitate. DeepSpec
JSONL format (spec §3.1). Deterministic: re-running rewrites the same file.
"""

import json
import os
import random

WORDS = ["apple", "river", "stone", "cloud", "tiger", "green", "house", "light", "music", "ocean", "plant", "quiet",
         "sugar", "table", "water", "zebra", "bread", "chair", "dream", "earth"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def conversation(rng: random.Random, i: int) -> dict:
    kind = i % 5
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}. So the answer is {a + b}."
    elif kind == 1:
        a = rng.randint(1, 20)
        n = rng.randint(5, 9)
        q = f"Count from {a} to {a + n}."
        ans = "Sure: " + ", ".join(str(x) for x in range(a, a + n + 1)) + ". Done counting."
    elif kind == 2:
        w = rng.choice(WORDS)
        q, ans = f"Spell the word {w}.", f"The word {w} is spelled " + "-".join(w.upper()) + f". That is {w}."
    elif kind == 3:
        w1, w2 = rng.sample(WORDS, 2)
        q = f"Repeat after me: the {w1} and the {w2}."
        ans = f"The {w1} and the {w2}. The {w1} and the {w2}. I repeated it twice."
    else:
        a = rng.randint(0, 10)
        q = f"Write the number {a} in words."
        ans = f"The number {a} is written as {NUMBER_WORDS[a]}. In words: {NUMBER_WORDS[a]}."
    return {"id": f"tiny-{i}", "conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": ans}], "status": "success"}


def main() -> None:
    rng = random.Random(42)
    out = os.path.join(os.path.dirname(__file__), "..", "dspark_jax", "assets", "tiny_conversations.jsonl")
    with open(out, "w") as f:
        for i in range(320):
            f.write(json.dumps(conversation(rng, i)) + "\n")
    print(f"wrote {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
