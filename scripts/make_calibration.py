#!/usr/bin/env python3
"""Writes profiler/data/calibration.txt: grade-school arithmetic word problems
with worked answers, in the shape of TailorKV's calibration prompt (a 50-shot
GSM8K prompt), generated from templates with a fixed seed so that the text is
original and reproducible. Usage: scripts/make_calibration.py [N_PROBLEMS]"""
import random
import sys

NAMES = ["Amara", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jade",
         "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = [("apples", "basket"), ("stamps", "album"), ("marbles", "jar"), ("books", "shelf"),
         ("pencils", "box"), ("cookies", "tray"), ("seeds", "packet"), ("cards", "deck"),
         ("shells", "bucket"), ("beads", "bag")]
JOBS = [("walks dogs", "dog"), ("mows lawns", "lawn"), ("washes cars", "car"),
        ("tutors students", "lesson"), ("bakes cakes", "cake")]


def problem(r):
    kind = r.randrange(5)
    a, b = r.sample(NAMES, 2)
    item, holder = r.choice(ITEMS)
    if kind == 0:
        n, k, g = r.randint(3, 9), r.randint(4, 12), r.randint(2, 15)
        total = n * k
        q = (f"{a} has {n} {holder}s with {k} {item} in each {holder}. {a} gives {g} {item} to "
             f"{b}. How many {item} does {a} have left?")
        s = (f"{a} starts with {n} * {k} = {total} {item}. After giving {g} away, {a} has "
             f"{total} - {g} = {total - g} {item}.")
        return q, s, total - g
    if kind == 1:
        job, unit = r.choice(JOBS)
        pay, per_week, weeks = r.randint(5, 25), r.randint(2, 7), r.randint(2, 6)
        spend = r.randint(1, pay * per_week * weeks // 2)
        earned = pay * per_week * weeks
        q = (f"{a} {job} and earns ${pay} per {unit}. {a} does {per_week} a week for {weeks} "
             f"weeks and then spends ${spend} on a gift for {b}. How much money does {a} keep?")
        s = (f"Each week {a} earns {pay} * {per_week} = ${pay * per_week}. Over {weeks} weeks that "
             f"is {pay * per_week} * {weeks} = ${earned}. After the gift, {a} keeps {earned} - "
             f"{spend} = ${earned - spend}.")
        return q, s, earned - spend
    if kind == 2:
        x = r.randint(10, 60)
        more = r.randint(2, 20)
        q = (f"{b} collected {x} {item}. {a} collected {more} more than {b}. How many {item} did "
             f"they collect together?")
        s = (f"{a} collected {x} + {more} = {x + more} {item}. Together they have {x} + "
             f"{x + more} = {2 * x + more} {item}.")
        return q, s, 2 * x + more
    if kind == 3:
        per, people = r.randint(2, 6), r.randint(3, 12)
        have = r.randint(5, per * people + 10)
        need = per * people
        if have >= need:
            q = (f"{a} is planning a party for {people} guests and wants {per} {item} for each "
                 f"guest. {a} already has {have} {item}. How many {item} will be left over?")
            s = (f"{a} needs {per} * {people} = {need} {item}. {a} has {have}, so {have} - "
                 f"{need} = {have - need} will be left over.")
            return q, s, have - need
        q = (f"{a} is planning a party for {people} guests and wants {per} {item} for each "
             f"guest. {a} already has {have} {item}. How many more {item} does {a} need?")
        s = (f"{a} needs {per} * {people} = {need} {item}. {a} has {have}, so {a} needs {need} - "
             f"{have} = {need - have} more.")
        return q, s, need - have
    speed, hours, extra = r.randint(30, 80), r.randint(2, 5), r.randint(10, 90)
    dist = speed * hours
    q = (f"{a} drives at {speed} kilometres per hour for {hours} hours, then {b} drives another "
         f"{extra} kilometres. How far did they travel in all?")
    s = (f"{a} drove {speed} * {hours} = {dist} kilometres. With {b}'s part the trip was {dist} + "
         f"{extra} = {dist + extra} kilometres.")
    return q, s, dist + extra


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    r = random.Random(20251122)
    out = []
    for _ in range(n):
        q, s, ans = problem(r)
        out.append(f"Question: {q}\nLet's think step by step. {s} The answer is {ans}.\n")
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
