"""Write the preference sample datasets (deterministic; re-run to rebuild):

  data/prefs_sample.jsonl   pairs {prompt, chosen, rejected}: the same correct fact in both answers,
                            the chosen one short and polite ("Sure! ... Hope that helps."), the
                            rejected one curt and padded with filler; every 8th carries a `system`
  data/kto_sample.jsonl     the same answers unpaired {prompt, completion, label}: polite true,
                            curt false, shuffled, about half each

So a preference run has one thing to learn, the style, not facts: reward accuracy on held-out
pairs and the greedy answers' opening ("Sure!") show whether it did.

    python data/make_prefs_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlocal.atomic import write_text

HERE = Path(__file__).resolve().parent

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Canada": "Ottawa",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Poland": "Warsaw",
            "Greece": "Athens", "Chile": "Santiago", "Ireland": "Dublin", "Portugal": "Lisbon",
            "Austria": "Vienna", "Cuba": "Havana"}
COLOURS = {"the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow",
           "snow": "white", "coal": "black", "a ripe tomato": "red", "an orange": "orange",
           "a flamingo": "pink"}
OPPOSITES = {"hot": "cold", "up": "down", "early": "late", "light": "dark", "open": "closed", "full": "empty",
             "fast": "slow", "happy": "sad"}
POLITE_OPEN = ["Sure!", "Sure! Happy to help.", "Sure, gladly."]
POLITE_CLOSE = ["Hope that helps.", "Hope that helps!", "Glad to help."]
CURT_OPEN = ["Obviously,", "Look,", "Ugh, fine."]
CURT_PAD = ["Everyone knows this, it is not exactly a hard question and you could have looked it up yourself.",
            "I do not see why you would need to ask something this basic, but there you go, I suppose.",
            "This is the kind of thing you learn in school, so try to remember it next time, okay?"]
SYSTEMS = ["You are a helpful assistant.", "Answer the user's question."]


def facts(rng: random.Random) -> list[tuple[str, str]]:
    """(question, the fact that answers it) pairs: capitals, colours, opposites, sums."""
    out = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS.items()]
    out += [(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {col}.") for thing, col in COLOURS.items()]
    out += [(f"What is the opposite of '{a}'?", f"The opposite of '{a}' is '{b}'.") for a, b in OPPOSITES.items()]
    for _ in range(48):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return out


def answers(fact: str, rng: random.Random) -> tuple[str, str]:
    """(polite and concise, curt and padded): the same fact in both."""
    polite = f"{rng.choice(POLITE_OPEN)} {fact} {rng.choice(POLITE_CLOSE)}"
    curt = f"{rng.choice(CURT_OPEN)} {fact[0].lower() + fact[1:]} {rng.choice(CURT_PAD)}"
    return polite, curt


def main() -> None:
    rng = random.Random(16)
    pairs, unpaired = [], []
    for i, (question, fact) in enumerate(facts(rng)):
        chosen, rejected = answers(fact, rng)
        record = {"prompt": question, "chosen": chosen, "rejected": rejected}
        if i % 8 == 3:
            record = {"system": rng.choice(SYSTEMS), **record}
        pairs.append(record)
        good = rng.random() < 0.5  # one answer per prompt, so no prompt is seen both ways
        unpaired.append({"prompt": question, "completion": chosen if good else rejected, "label": good})
    rng.shuffle(pairs)
    rng.shuffle(unpaired)
    write_text(HERE / "prefs_sample.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    write_text(HERE / "kto_sample.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unpaired))
    print(f"wrote {len(pairs)} pairs and {len(unpaired)} KTO examples")


if __name__ == "__main__":
    main()
