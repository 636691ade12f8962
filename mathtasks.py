"""Tasks of the `math` env (the env itself is in envs.py).

Built-in tasks: procedural word problems needing exact arithmetic, five levels (LEVEL_KINDS):
    L1 sum / difference of two 4-6 digit numbers      L2 products (3x3 or 4x2 digits)
    L3 percentages, remainders, floor / ceiling division
    L4 multi-step: shopping totals, change, discounts, production, wages
    L5 sums of ranges / multiples / squares, modular powers and chains, exponential growth, digit sums
Task i of a split has level levels[i % len(levels)]; its rng is seeded by sha256 of (seed, split, i,
attempt), and a question is kept only if sha256(question) has the split's parity (train even, test
odd), so the splits are disjoint by construction. Different `seed`s give different task sets (the
test split included). Each answer is exact (closed forms over Fractions, formatted by format_answer).

`data=path`: a JSONL file of {"question", "answer"} lines; ALL its lines form the requested split
(pass a separate file for test). Ids are "math/<file stem>/<record index>".
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from fractions import Fraction

from envbase import stable_seed


def format_answer(x: Fraction) -> str:
    """Exact answer text: an integer, a terminating decimal ("12.75"), or a reduced fraction "a/b"."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    k = next((k for k in range(1, 64) if (x * 10**k).denominator == 1), None)
    if k is None:
        return f"{x.numerator}/{x.denominator}"
    digits = str(abs(x.numerator * 10**k // x.denominator)).rjust(k + 1, "0")
    return ("-" if x < 0 else "") + digits[:-k] + "." + digits[-k:]


LEVEL_KINDS = {
    1: ("add", "sub"),
    2: ("mul",),
    3: ("percent", "remainder", "floordiv", "ceildiv"),
    4: ("shopping", "change", "discount", "production", "wage"),
    5: ("range_sum", "multiples_sum", "squares_sum", "powmod", "mod_chain", "growth", "digit_sum"),
}
TEMPLATES = {
    "add": ("What is {a} + {b}?", "Compute the sum of {a} and {b}.",
            "A warehouse holds {a} boxes and receives {b} more. How many boxes does it hold now?",
            "{name} walked {a} steps last month and {b} steps this month. How many steps is that in total?"),
    "sub": ("What is {a} - {b}?", "How much larger is {a} than {b}?",
            "A library owns {a} books and {b} of them are checked out. How many books are on the shelves?",
            "A town had {a} residents, then {b} moved away. How many residents remain?"),
    "mul": ("What is {a} times {b}?", "Multiply {a} by {b}.",
            "A stadium has {a} rows with {b} seats in each row. How many seats are there?",
            "Each of {a} crates holds {b} apples. How many apples are there in all?"),
    "percent": ("What is {pct}% of {n}?",
                "A school has {n} students and {pct}% of them take the bus. How many students take the bus?",
                "A farm harvested {n} apples and sold {pct}% of them. How many apples were sold?"),
    "remainder": ("What is the remainder when {n} is divided by {d}?", "What is {n} mod {d}?",
                  "{n} marbles are shared equally among {d} children, each getting as many as possible. "
                  "How many marbles are left over?"),
    "floordiv": ("How many full boxes of {d} eggs can be packed from {n} eggs?",
                 "What is {n} divided by {d}, rounded down to a whole number?",
                 "A ribbon is {n} cm long. How many whole pieces of {d} cm can be cut from it?"),
    "ceildiv": ("A bus holds {d} people. How many buses are needed to carry {n} people?",
                "Each box holds {d} books. How many boxes are needed to pack {n} books?"),
    "shopping": ("{name} buys {list}. How much does {name} spend in dollars?",
                 "A customer orders {list}. What is the total cost in dollars?"),
    "change": ("{name} buys {list} and pays ${bill}. How much change does {name} get, in dollars?",),
    "discount": ("A {item} costs ${price}. During a sale everything is {off}% off. "
                 "How much do {qty} {item}s cost in the sale, in dollars?",
                 "A store sells a {item} for ${price}. With a {off}% discount, what do {qty} {item}s cost in dollars?"),
    "production": ("A factory makes {rate} parts per day. After {days} days it has shipped {shipped} parts. "
                   "How many parts are left?",
                   "A bakery bakes {rate} rolls a day for {days} days and sells {shipped} of them. "
                   "How many rolls are left?"),
    "wage": ("{name} earns ${wage} per hour and works {hours} hours a week. After {weeks} weeks {name} also gets "
             "a ${bonus} bonus. How much does {name} earn in total, in dollars?",
             "A worker is paid ${wage} an hour for {hours} hours each week. What is the pay for {weeks} weeks "
             "plus a ${bonus} bonus, in dollars?"),
    "range_sum": ("What is the sum of all integers from {lo} to {hi}, inclusive?",
                  "Add up every whole number from {lo} to {hi}. What is the total?"),
    "multiples_sum": ("What is the sum of all multiples of {k} between {lo} and {hi}, inclusive?",
                      "Add up every number from {lo} to {hi} that is divisible by {k}. What is the total?"),
    "squares_sum": ("What is the sum of the squares of the integers from {lo} to {hi}, inclusive?",
                    "What is the sum of n^2 for n from {lo} to {hi}?"),
    "powmod": ("What is the remainder when {base}^{exp} is divided by {mod}?",
               "What is {base} to the power of {exp}, modulo {mod}?"),
    "mod_chain": ("What is the remainder when {a} times {b} plus {c} is divided by {m}?",
                  "Compute ({a} * {b} + {c}) mod {m}."),
    "growth": ("A colony of {start} bacteria {grows} every hour. How many bacteria are there after {hours} hours?",
               "A number starts at {start} and is multiplied by {factor}, {hours} times in a row. What is the result?"),
    "digit_sum": ("What is the sum of the digits of {base}^{exp}?",
                  "What is the sum of the digits of {base} to the power of {exp}?"),
}
NAMES = ("Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemal", "Lena")
ITEMS = ("notebook", "pen", "mug", "towel", "lamp", "shirt", "book", "candle", "plant", "cable", "basket", "pillow")
DEFAULT_N = {"train": 10000, "test": 500}



def _dollars(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def sample_params(rng: random.Random, kind: str) -> dict:
    """The numbers (and names) of one problem of `kind`; its answer is ANSWER[kind](params)."""
    R = rng.randint
    if kind in ("add", "sub"):
        a, b = R(1000, 999999), R(1000, 999999)
        return {"a": max(a, b), "b": min(a, b)} if kind == "sub" else {"a": a, "b": b}
    if kind == "mul":
        da, db = rng.choice([(3, 3), (3, 3), (4, 2)])
        return {"a": R(10**(da - 1), 10**da - 1), "b": R(10**(db - 1), 10**db - 1)}
    if kind == "percent":  # n is a multiple of 100/gcd(pct, 100), so the answer is a whole number
        pct = R(1, 99)
        unit = 100 // math.gcd(pct, 100)
        return {"pct": pct, "n": unit * R(-(-200 // unit), 99999 // unit)}
    if kind in ("remainder", "floordiv", "ceildiv"):
        return {"n": R(10000, 999999), "d": R(7, 99)}
    if kind in ("shopping", "change"):  # items: [name, quantity, unit price in cents]
        p = {"items": [[g, R(2, 12), R(105, 4999)] for g in rng.sample(ITEMS, R(2, 3))]}
        if kind == "change":
            total = sum(q * c for _, q, c in p["items"])
            p["bill"] = next(b for b in (20, 50, 100, 200, 500, 1000, 2000) if 100 * b > total)
        return p
    if kind == "discount":
        return {"item": rng.choice(ITEMS), "price": R(20, 999), "off": 5 * R(1, 12), "qty": R(2, 15)}
    if kind == "production":
        rate, days = R(120, 9999), R(12, 60)
        return {"rate": rate, "days": days, "shipped": R(rate, rate * days - 1)}
    if kind == "wage":
        return {"wage": R(12, 85), "hours": R(15, 45), "weeks": R(3, 52), "bonus": R(100, 2000)}
    if kind == "range_sum":
        return {"lo": R(100, 999), "hi": R(1000, 9999)}
    if kind == "multiples_sum":
        return {"k": R(6, 49), "lo": R(100, 999), "hi": R(2000, 20000)}
    if kind == "squares_sum":
        return {"lo": R(10, 99), "hi": R(100, 400)}
    if kind == "powmod":
        return {"base": R(3, 99), "exp": R(20, 99), "mod": R(101, 9999)}
    if kind == "mod_chain":
        return {"a": R(1000, 99999), "b": R(1000, 99999), "c": R(1000, 99999), "m": R(11, 997)}
    if kind == "growth":
        return {"start": R(10, 999), "factor": rng.choice([2, 3]), "hours": R(12, 30)}
    if kind == "digit_sum":
        return {"base": rng.choice([2, 3, 7]), "exp": R(50, 300)}
    raise ValueError(f"unknown math problem kind {kind!r}")


def _sum_squares(n: int) -> int:
    return n * (n + 1) * (2 * n + 1) // 6


def _sum_multiples(k: int, lo: int, hi: int) -> int:
    first, last = -(-lo // k) * k, hi // k * k
    return (first + last) * ((last - first) // k + 1) // 2


ANSWER = {  # kind -> exact answer by closed form (the tests re-derive every kind by brute force)
    "add": lambda p: p["a"] + p["b"],
    "sub": lambda p: p["a"] - p["b"],
    "mul": lambda p: p["a"] * p["b"],
    "percent": lambda p: Fraction(p["pct"] * p["n"], 100),
    "remainder": lambda p: p["n"] % p["d"],
    "floordiv": lambda p: p["n"] // p["d"],
    "ceildiv": lambda p: -(-p["n"] // p["d"]),
    "shopping": lambda p: Fraction(sum(q * c for _, q, c in p["items"]), 100),
    "change": lambda p: p["bill"] - Fraction(sum(q * c for _, q, c in p["items"]), 100),
    "discount": lambda p: Fraction(p["price"] * p["qty"] * (100 - p["off"]), 100),
    "production": lambda p: p["rate"] * p["days"] - p["shipped"],
    "wage": lambda p: p["wage"] * p["hours"] * p["weeks"] + p["bonus"],
    "range_sum": lambda p: (p["lo"] + p["hi"]) * (p["hi"] - p["lo"] + 1) // 2,
    "multiples_sum": lambda p: _sum_multiples(p["k"], p["lo"], p["hi"]),
    "squares_sum": lambda p: _sum_squares(p["hi"]) - _sum_squares(p["lo"] - 1),
    "powmod": lambda p: pow(p["base"], p["exp"], p["mod"]),
    "mod_chain": lambda p: (p["a"] * p["b"] + p["c"]) % p["m"],
    "growth": lambda p: p["start"] * p["factor"] ** p["hours"],
    "digit_sum": lambda p: sum(map(int, str(p["base"] ** p["exp"]))),
}


def render_question(rng: random.Random, kind: str, p: dict) -> str:
    """Fill one of the kind's TEMPLATES (chosen by rng) with the params and a few display words."""
    extra = {"name": rng.choice(NAMES), "grows": {2: "doubles", 3: "triples"}.get(p.get("factor"))}
    if "items" in p:
        parts = [f"{q} {g}s at {_dollars(c)} each" for g, q, c in p["items"]]
        extra["list"] = ", ".join(parts[:-1]) + " and " + parts[-1]
    return rng.choice(TEMPLATES[kind]).format(**p, **extra)


def generate_task(split: str, index: int, level: int, seed: int = 0) -> dict:
    """Task math/<split>/<index>: deterministic in (split, index, level, seed). Redraws until the
    question's sha256 parity matches the split (train even, test odd): disjoint by construction."""
    parity = {"train": 0, "test": 1}[split]
    for attempt in range(1000):
        rng = random.Random(stable_seed("math", seed, split, index, attempt))
        kind = rng.choice(LEVEL_KINDS[level])
        params = sample_params(rng, kind)
        question = render_question(rng, kind, params)
        if hashlib.sha256(question.encode()).digest()[0] % 2 == parity:
            return {"id": f"math/{split}/{index}", "question": question, "answer": format_answer(Fraction(ANSWER[kind](params))),
                    "level": level, "kind": kind, "params": params}
    raise RuntimeError(f"no {split} question found for math index {index}")  # p = 2^-1000


def read_jsonl_tasks(path: str) -> list[dict]:
    """User tasks: one {"question": str, "answer": str | number} object per non-blank line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read math data file {path!r}: {e}. Fix: pass a readable UTF-8 JSONL file.") from e
    stem, tasks = os.path.splitext(os.path.basename(path))[0], []
    fix = 'Fix: make every non-blank line one JSON object {"question": "...", "answer": "..."}.'
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}). {fix}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with \"question\" and \"answer\", "
                             f"got {type(row).__name__}. {fix}")
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: \"question\" must be a non-empty string, got {q!r}. {fix}")
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
            raise ValueError(f"{where}: \"answer\" must be a non-empty string or a number, got {a!r}. {fix}")
        tasks.append({"id": f"math/{stem}/{len(tasks)}", "question": q, "answer": str(a), "level": row.get("level")})
    if not tasks:
        raise ValueError(f"math data file {path!r} holds no tasks. Fix: one {{\"question\", \"answer\"}} object per line.")
    return tasks


def parse_levels(text: str) -> tuple[int, ...]:
    """The --levels flag: "3,4,5" -> (3, 4, 5), each a key of LEVEL_KINDS (a repeat weights a level)."""
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        levels = ()
    if not levels or any(lv not in LEVEL_KINDS for lv in levels):
        raise ValueError(f"--levels must be a comma list of the math levels {','.join(map(str, LEVEL_KINDS))} "
                         f"(e.g. 4,5), got {text!r}")
    return levels


def load_math_tasks(split: str, n: int | None = None, data: str | None = None, seed: int = 0,
                    levels=(1, 2, 3, 4, 5)) -> list[dict]:
    """Without `data`: n procedural tasks (default 10000 train / 500 test), levels mixed by index
    (repeat a level in `levels` to weight it). With `data`: the first n records of the file."""
    if split not in DEFAULT_N:
        raise ValueError(f"math split must be one of {sorted(DEFAULT_N)}, got {split!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 (or None for the default), got {n}")
    if data is not None:
        tasks = read_jsonl_tasks(data)
        if n is not None and n > len(tasks):
            raise ValueError(f"n={n} but {data!r} holds only {len(tasks)} tasks. Fix: pass n <= {len(tasks)} or None.")
        return tasks[:n]
    levels = tuple(levels)
    if not levels or any(lv not in LEVEL_KINDS for lv in levels):
        raise ValueError(f"levels must be a non-empty sequence of {sorted(LEVEL_KINDS)}, got {levels!r}")
    return [generate_task(split, i, levels[i % len(levels)], seed) for i in range(n or DEFAULT_N[split])]
