#!/usr/bin/env python3
"""Writes eval/data/retrieval_facts.jsonl: facts hidden in unrelated prose, for
`tkv_accuracy --prompt-file` (format: eval/README.md, "prompt files").

Each case is a raw completion: a haystack of filler text with one fact
sentence at a depth, then a question whose answer sentence the model must
complete. Several fillers (the shipped lighthouse prose and three generated
registers: a ship's log, a gardening guide, meeting minutes, each with its own
numbers as distractors) and several phrasings of the fact (numbers of 5 to 7
digits, and one word-valued fact), at four haystack sizes (about 350, 1,100,
2,500 and 5,000 tokens of SmolLM2) and three depths. Seeded: the same seed
always writes the same file. Held out from the profiler's calibration text
(profiler/data/calibration.txt, word problems) by construction.

Usage: scripts/make_retrieval_prompts.py [--seed N] [--out PATH]
"""
import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Words per case: the haystack, at about 1.25 SmolLM2 tokens per word.
SIZES = [280, 880, 2000, 4000]
DEPTHS = [0.1, 0.5, 0.9]

PLACES = ["Harlow", "Brindle", "Oakmere", "Castlewick", "Fenmoor", "Ravensby", "Larkfield",
          "Thornbury", "Millbrook", "Ashcombe", "Kestrel", "Wrenford"]
NAMES = ["Marguerite", "Tobias", "Ingrid", "Desmond", "Philippa", "Rowan", "Cordelia", "Ezekiel",
         "Henrietta", "Augustin", "Beatrix", "Lysander"]
CITIES = ["Valparaiso", "Trondheim", "Marrakesh", "Adelaide", "Winnipeg", "Cartagena", "Tallinn",
          "Nagasaki", "Bergen", "Antwerp", "Mombasa", "Halifax"]
INGREDIENTS = ["cardamom", "saffron", "tarragon", "fenugreek", "juniper", "sumac", "lovage",
               "marjoram", "sorrel", "anise"]
LANDMARKS = ["windmill", "chapel", "stone bridge", "oak tree", "watchtower", "well"]

# (fact, question ending in the prefix of the answer, answer kind)
FACTS = [
    ("The access code for the {place} archive is {num}.",
     "Question: What is the access code for the {place} archive?\n"
     "Answer: The access code for the {place} archive is", "num"),
    ("{name} keeps a spare key in locker number {num}.",
     "Question: In which locker does {name} keep a spare key?\n"
     "Answer: {name} keeps a spare key in locker number", "num"),
    ("The shipment bound for {city} was logged under order number {num}.",
     "Question: Under which order number was the shipment bound for {city} logged?\n"
     "Answer: The shipment bound for {city} was logged under order number", "num"),
    ("Remember this: the treasure lies exactly {num} paces north of the old {landmark}.",
     "Question: How many paces north of the old {landmark} does the treasure lie?\n"
     "Answer: The treasure lies exactly", "num"),
    ("The secret ingredient in {name}'s famous soup is {ingredient}.",
     "Question: What is the secret ingredient in {name}'s famous soup?\n"
     "Answer: The secret ingredient in {name}'s famous soup is", "word"),
    ("For the record, the {place} lighthouse keeper's badge number is {num}.",
     "Question: What is the {place} lighthouse keeper's badge number?\n"
     "Answer: The {place} lighthouse keeper's badge number is", "num"),
]


def lighthouse_sentences(rng):
    with open(os.path.join(ROOT, "eval/data/prose.txt"), encoding="utf-8") as f:
        text = f.read()
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(". ") if s.strip()]
    start = rng.randrange(len(sentences))
    while True:
        for i in range(len(sentences)):
            yield sentences[(start + i) % len(sentences)].replace("..", ".")


def logbook_sentences(rng):
    dirs = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
    acts = ["mended the foresail", "scrubbed the deck", "hauled in the nets", "checked the bilge",
            "tarred the rigging", "took soundings off the bow", "stowed the spare canvas",
            "repainted the rail", "trimmed the lamps", "sang to pass the watch"]
    skies = ["overcast", "clear", "hazy", "squally", "bright", "grey and low"]
    day = rng.randrange(1, 40)
    while True:
        day += 1
        yield f"Day {day} of the voyage."
        yield (f"The wind came from the {rng.choice(dirs)} at {rng.randrange(4, 35)} knots "
               f"and the sky was {rng.choice(skies)}.")
        yield f"The crew {rng.choice(acts)} before noon, then {rng.choice(acts)} in the afternoon."
        yield (f"We logged {rng.randrange(20, 160)} nautical miles, and the barometer read "
               f"{rng.randrange(985, 1035)} millibars at dusk.")
        if rng.random() < 0.5:
            yield (f"The cook opened barrel number {rng.randrange(2, 90)} of salted pork, "
                   f"which the men judged {rng.choice(['passable', 'tough', 'excellent', 'too salty'])}.")


def garden_sentences(rng):
    plants = ["foxglove", "lavender", "runner bean", "dahlia", "rhubarb", "sweet pea", "hellebore",
              "rosemary", "peony", "courgette", "hollyhock", "leek"]
    soils = ["sandy", "clay", "chalky", "loamy", "peaty", "well-drained"]
    months = ["March", "April", "May", "June", "July", "August", "September"]
    while True:
        p = rng.choice(plants)
        yield f"The {p} grows best in {rng.choice(soils)} soil and flowers around {rng.choice(months)}."
        yield (f"Space the plants about {rng.randrange(15, 90)} centimetres apart and water them "
               f"{rng.choice(['weekly', 'sparingly', 'every other day', 'deeply in dry spells'])}.")
        yield (f"Many gardeners mulch the {p} in autumn, since frost below minus "
               f"{rng.randrange(3, 15)} degrees can damage the roots.")
        if rng.random() < 0.6:
            yield (f"Slugs are the main pest; a ring of grit or a beer trap usually keeps them away "
                   f"from the young {p} shoots.")


def minutes_sentences(rng):
    topics = ["the roof repairs", "the summer fete", "parking on the high street", "the library hours",
              "the new footpath", "the allotment waiting list", "street lighting", "the village hall budget"]
    item = rng.randrange(1, 20)
    while True:
        item += 1
        who = rng.choice(NAMES)
        yield f"Item {item}: the committee discussed {rng.choice(topics)}."
        yield (f"{who} proposed setting aside {rng.randrange(100, 9000)} pounds, and the motion was "
               f"{rng.choice(['carried', 'deferred', 'rejected', 'carried with one abstention'])}.")
        yield (f"It was agreed to revisit the matter at the meeting on the "
               f"{rng.randrange(1, 29)}th of {rng.choice(['May', 'June', 'October', 'November'])}.")


FILLERS = {"lighthouse": lighthouse_sentences, "logbook": logbook_sentences,
           "garden": garden_sentences, "minutes": minutes_sentences}


def haystack(gen, words):
    out, n = [], 0
    while n < words:
        s = next(gen)
        out.append(s)
        n += len(s.split())
    return out


def make_case(rng, filler, size, depth, fact_idx):
    fact_t, question_t, kind = FACTS[fact_idx]
    values = {"place": rng.choice(PLACES), "name": rng.choice(NAMES), "city": rng.choice(CITIES),
              "landmark": rng.choice(LANDMARKS), "ingredient": rng.choice(INGREDIENTS),
              "num": str(rng.randrange(10 ** (rng.randrange(4, 7)), 10 ** 7))}
    fact = fact_t.format(**values)
    question = question_t.format(**values)
    answer = values["num"] if kind == "num" else values["ingredient"]
    sentences = haystack(FILLERS[filler](rng), size)
    at = round(depth * len(sentences))
    sentences.insert(at, fact)
    intro = "Read the following text carefully. A question about it follows.\n\n"
    prompt = intro + " ".join(sentences) + "\n\n" + question
    return {"name": f"{filler}-w{size}-d{int(depth * 100)}-f{fact_idx}", "prompt": prompt,
            "expect": [answer], "max_tokens": 12}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--out", default=os.path.join(ROOT, "eval/data/retrieval_facts.jsonl"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    cases = []
    # Every filler at every size and depth; the phrasing rotates so each
    # (filler, phrasing) pair occurs twice.
    for fi, filler in enumerate(FILLERS):
        for si, size in enumerate(SIZES):
            for di, depth in enumerate(DEPTHS):
                fact_idx = (fi + si * len(DEPTHS) + di) % len(FACTS)
                cases.append(make_case(rng, filler, size, depth, fact_idx))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(f"# made by scripts/make_retrieval_prompts.py --seed {args.seed}; "
                f"{len(cases)} cases (eval/README.md)\n")
        for c in cases:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
