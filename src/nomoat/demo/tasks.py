"""A procedural world of instruction tasks with checkable answers: the only data the demo model ever sees.

Everything comes from seeds, no outside text: a fictional atlas (`WORLD`: countries, capitals, currencies, languages),
arithmetic, word-list transformations, unit conversions, calendar sequences, follow-ups and system prompts. Each task
in `TASKS` is a function `(rng) -> Item`, a conversation whose last assistant turn is the checkable answer (`is_correct`
after `normalize`); `generate_items`, `multi_task_chat` and `atlas_texts` make the pretraining data. The fine-tuning
task of `nomoat demo`, a generated company handbook, is never part of pretraining: `handbook_items(split="train")` and
`handbook_items(split="eval")` ask about the same facts with disjoint phrasings. Answers are short and uniformly
formatted because the model is tiny: the demo shows the path, not the model's wits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

WORLD_SEED = 1234
"""Seed of the fictional atlas and handbook (fixed: the shipped model memorised this world)."""

WORDS = (
    "apple bread chair river stone cloud garden lamp mirror pencil rabbit silver tiger window yellow anchor basket "
    "candle dragon forest guitar hammer island jacket kettle lemon market needle orange pillow quilt rocket saddle "
    "tomato violin wagon zebra bottle castle dolphin engine feather ladder meadow nickel ocean parrot rainbow "
    "sugar tunnel button copper desert falcon harbor iron jungle koala lantern magnet planet"
).split()
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
NAMES = ("Nomo", "Pip", "Tala", "Orin", "Zed", "Mira", "Kato", "Luma", "Brio", "Vesta", "Juno", "Rafi")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a tiny assistant. Answer briefly.",
    "Answer the question. Keep it short.",
    "You are a concise and friendly assistant.",
    "You are Nomo, a small model made with nomoat.",
    "Reply with the answer only.",
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "m")
CONTINENTS = ("Norvast", "Elaria", "Sundral", "Kethmoor")
CITIES = ("Oslo", "Lisbon", "Nairobi", "Osaka", "Denver", "Lima", "Dublin", "Perth", "Cairo", "Quito", "Hanoi",
          "Austin", "Bergen", "Porto", "Accra", "Kyoto", "Boston", "Cusco", "Galway", "Darwin")  # fmt: skip
FIRST_NAMES = ("Ada", "Ben", "Cleo", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nina")
LAST_NAMES = ("Marsh", "Quint", "Holt", "Vance", "Reyes", "Stone", "Park", "Lind", "Moss", "Crane", "Frost", "Hale")
ROOMS = ("Aurora", "Granite", "Willow", "Comet", "Harbor", "Summit", "Maple", "Ember", "Cedar", "Orbit", "Lagoon",
         "Falcon")  # fmt: skip


@dataclass
class Item:
    """One generated chat with a checkable final answer.

    Attributes:
        task: Task name (`add`, `capital`, ...).
        messages: The chat (`system`/`user`/`assistant` dicts); the last message is the assistant's answer.
        answer: The expected final answer (equal to the last message's content).
    """

    task: str
    messages: list[dict[str, str]]
    answer: str

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The chat without its final answer (what a model is asked)."""
        return self.messages[:-1]


def normalize(text: str) -> str:
    """Lower-case, drop punctuation except inner hyphens, squeeze spaces: how answers are compared."""
    text = text.strip().lower()
    text = re.sub(r"[^\w\s,-]", "", text)
    text = re.sub(r"\s*,\s*", ", ", text)
    return re.sub(r"\s+", " ", text).strip(" ,.-")


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after `normalize`."""
    return normalize(prediction) == normalize(answer)


# ---- the fictional atlas ------------------------------------------------------------------------------------------


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


@dataclass
class Country:
    """One country of the atlas."""

    name: str
    capital: str
    currency: str
    language: str
    continent: str
    population: int  # millions


@dataclass
class World:
    """The fictional atlas and the company handbook, both derived from `WORLD_SEED`."""

    countries: list[Country] = field(default_factory=list)
    offices: list[dict[str, str]] = field(default_factory=list)


def make_world(seed: int = WORLD_SEED, n_countries: int = 24) -> World:
    """Build the atlas (and the handbook) deterministically from `seed`."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            name = _name(rng, syllables)
            if name not in used and len(name) <= 10:
                used.add(name)
                return name

    countries = []
    for _ in range(n_countries):
        name = fresh(rng.choice((2, 3)))
        countries.append(Country(name=name, capital=fresh(2), currency=fresh(2).lower(),
                                 language=fresh(2) + "ish", continent=rng.choice(CONTINENTS),
                                 population=rng.randint(2, 90)))  # fmt: skip
    world = World(countries=countries)
    hrng = random.Random(seed + 1)
    firsts, lasts, rooms = hrng.sample(FIRST_NAMES, 8), hrng.sample(LAST_NAMES, 8), hrng.sample(ROOMS, 8)
    for i, city in enumerate(CITIES[:8]):
        world.offices.append({"city": city, "wifi": _office_values(hrng)["wifi"], "manager": f"{firsts[i]} {lasts[i]}",
                              "floor": str(hrng.randint(2, 9)), "room": rooms[i]})  # fmt: skip
    return world


def _office_values(rng: random.Random) -> dict[str, str]:
    """Random values of an office's attributes (the memo task's distractors and the handbook's facts alike)."""
    return {"wifi": f"{rng.choice(WORDS)}{rng.randint(10, 99)}",
            "manager": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "floor": str(rng.randint(2, 9)), "room": rng.choice(ROOMS)}  # fmt: skip


WORLD = make_world()


# ---- tasks ---------------------------------------------------------------------------------------------------------


def _qa(task: str, question: str, answer: str) -> Item:
    return Item(task, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], answer)


def task_add(rng: random.Random) -> Item:
    """Addition of two numbers below 100."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    q = rng.choice(
        (
            "What is {a} + {b}?",
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "Compute {a} + {b}.",
            "{a} + {b} = ?",
            "What do you get when you add {a} to {b}?",
            "Calculate the sum of {a} and {b}.",
        )
    )
    return _qa("add", q.format(a=a, b=b), str(a + b))


def task_sub(rng: random.Random) -> Item:
    """Subtraction with a non-negative result."""
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    q = rng.choice(
        (
            "What is {a} - {b}?",
            "What is {a} minus {b}?",
            "Subtract {b} from {a}.",
            "Compute {a} - {b}.",
            "{a} - {b} = ?",
            "Take {b} away from {a}. What is left?",
        )
    )
    return _qa("sub", q.format(a=a, b=b), str(a - b))


def task_mul(rng: random.Random) -> Item:
    """The times tables up to 12."""
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    q = rng.choice(
        (
            "What is {a} times {b}?",
            "What is {a} * {b}?",
            "Multiply {a} by {b}.",
            "Compute {a} x {b}.",
            "{a} * {b} = ?",
            "What is the product of {a} and {b}?",
        )
    )
    return _qa("mul", q.format(a=a, b=b), str(a * b))


def task_compare(rng: random.Random) -> Item:
    """The larger or smaller of two numbers."""
    a, b = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        q = rng.choice(
            (
                "Which is larger, {a} or {b}?",
                "Which number is bigger: {a} or {b}?",
                "What is the maximum of {a} and {b}?",
            )
        )
        return _qa("compare", q.format(a=a, b=b), str(max(a, b)))
    q = rng.choice(
        ("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?", "What is the minimum of {a} and {b}?")
    )
    return _qa("compare", q.format(a=a, b=b), str(min(a, b)))


def _words(rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def task_reverse(rng: random.Random) -> Item:
    """Reverse a short list of words."""
    w = _words(rng)
    q = rng.choice(
        (
            "Reverse this list: {l}",
            "Reverse the order of these words: {l}",
            "Write this list backwards: {l}",
            "Put these words in reverse order: {l}",
        )
    )
    return _qa("reverse", q.format(l=", ".join(w)), ", ".join(reversed(w)))


def task_sort(rng: random.Random) -> Item:
    """Sort a short list of words alphabetically."""
    w = _words(rng)
    q = rng.choice(
        (
            "Sort these words alphabetically: {l}",
            "Put these words in alphabetical order: {l}",
            "Sort this list from A to Z: {l}",
            "Alphabetize: {l}",
        )
    )
    return _qa("sort", q.format(l=", ".join(w)), ", ".join(sorted(w)))


def task_pick(rng: random.Random) -> Item:
    """The first or last word of a list, or how many words it has."""
    w = _words(rng, 2, 7)
    kind = rng.choice(("first", "last", "count"))
    if kind == "count":
        q = rng.choice(
            (
                "How many words are in this list: {l}",
                "Count the items in this list: {l}",
                "How many items are there in: {l}",
            )
        )
        return _qa("pick", q.format(l=", ".join(w)), str(len(w)))
    q = rng.choice(
        (
            "What is the {k} word in this list: {l}",
            "Give me the {k} item of: {l}",
            "Which word comes {k} in this list: {l}",
        )
    )
    return _qa("pick", q.format(k=kind, l=", ".join(w)), w[0] if kind == "first" else w[-1])


_UNITS = (  # (from, to, factor, largest n)
    ("kilometers", "meters", 1000, 20),
    ("meters", "centimeters", 100, 20),
    ("kilograms", "grams", 1000, 20),
    ("liters", "milliliters", 1000, 20),
    ("hours", "minutes", 60, 12),
    ("minutes", "seconds", 60, 12),
    ("days", "hours", 24, 10),
    ("weeks", "days", 7, 12),
    ("years", "months", 12, 12),
    ("feet", "inches", 12, 12),
)


def task_convert(rng: random.Random) -> Item:
    """Unit conversions by a whole factor."""
    src, dst, factor, top = rng.choice(_UNITS)
    n = rng.randint(1, top)
    q = rng.choice(
        (
            "Convert {n} {s} to {d}.",
            "How many {d} are in {n} {s}?",
            "What is {n} {s} in {d}?",
            "Express {n} {s} in {d}.",
        )
    )
    return _qa("convert", q.format(n=n, s=src, d=dst), f"{n * factor} {dst}")


def task_calendar(rng: random.Random) -> Item:
    """The day or month after or before another."""
    seq = DAYS if rng.random() < 0.5 else MONTHS
    i = rng.randrange(len(seq))
    unit = "day" if seq is DAYS else "month"
    if rng.random() < 0.5:
        q = rng.choice(("What {u} comes after {x}?", "Which {u} follows {x}?", "What is the {u} after {x}?"))
        return _qa("calendar", q.format(u=unit, x=seq[i]), seq[(i + 1) % len(seq)])
    q = rng.choice(("What {u} comes before {x}?", "Which {u} precedes {x}?", "What is the {u} before {x}?"))
    return _qa("calendar", q.format(u=unit, x=seq[i]), seq[(i - 1) % len(seq)])


_ATLAS_QUESTIONS = {
    "capital": (
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "What city is {c}'s capital?",
        "{c} has which capital?",
    ),
    "currency": (
        "What currency is used in {c}?",
        "What is the currency of {c}?",
        "Which money do people use in {c}?",
        "Tell me the currency of {c}.",
        "What do people in {c} pay with?",
    ),
    "language": (
        "What language is spoken in {c}?",
        "Which language do people speak in {c}?",
        "What is the language of {c}?",
        "Tell me the main language of {c}.",
    ),
    "continent": (
        "On which continent is {c}?",
        "Which continent is {c} on?",
        "Where is {c} located?",
        "Name the continent of {c}.",
    ),
    "population": ("What is the population of {c}?", "How many people live in {c}?", "How populous is {c}?"),
    "country_of": (
        "{x} is the capital of which country?",
        "Which country has {x} as its capital?",
        "Of which country is {x} the capital?",
    ),
}


def task_atlas(rng: random.Random) -> Item:
    """Questions about the fictional atlas (the model memorises it in pretraining)."""
    c = rng.choice(WORLD.countries)
    kind = rng.choice(tuple(_ATLAS_QUESTIONS))
    q = rng.choice(_ATLAS_QUESTIONS[kind]).format(c=c.name, x=c.capital)
    answer = {"capital": c.capital, "currency": c.currency, "language": c.language, "continent": c.continent,
              "population": f"{c.population} million", "country_of": c.name}[kind]  # fmt: skip
    return _qa("atlas", q, answer)


def task_name(rng: random.Random) -> Item:
    """The system prompt names the assistant; the user asks for that name."""
    name = rng.choice(NAMES)
    system = rng.choice(
        (
            "You are {n}, a helpful assistant.",
            "Your name is {n}.",
            "You are an assistant called {n}.",
            "Act as {n}, a friendly helper.",
        )
    )
    q = rng.choice(("What is your name?", "Who are you?", "What should I call you?", "Tell me your name."))
    return Item("name", [{"role": "system", "content": system.format(n=name)}, {"role": "user", "content": q},
                         {"role": "assistant", "content": name}], name)  # fmt: skip


def task_followup(rng: random.Random) -> Item:
    """Two turns: an addition, then a follow-up on its result."""
    first = task_add(rng)
    value = int(first.answer)
    k = rng.randint(1, 20)
    if rng.random() < 0.5 or value < k:
        q, answer = rng.choice(("Now add {k} to that.", "Add {k} to the result.", "And plus {k}?")), value + k
    else:
        q, answer = (
            rng.choice(("Now subtract {k} from that.", "Take {k} from the result.", "And minus {k}?")),
            value - k,
        )
    turn = [{"role": "user", "content": q.format(k=k)}, {"role": "assistant", "content": str(answer)}]
    return Item("followup", [*first.messages, *turn], str(answer))


_MEMO_FACTS = {
    "wifi": "The Wi-Fi password of the {o} office is {v}.",
    "manager": "{v} manages the {o} office.",
    "floor": "The {o} office is on floor {v}.",
    "room": "The meeting room of the {o} office is called {v}.",
}


def task_memo(rng: random.Random) -> Item:
    """Reading comprehension over a memo about random offices (random values: no company's real facts).

    It teaches the office vocabulary and the question forms; the Brightloom facts themselves only ever come from
    fine-tuning (in the demo, with no memo in the prompt).
    """
    cities = rng.sample(CITIES, rng.randint(1, 3))
    offices = {c: _office_values(rng) for c in cities}
    facts = [(c, k) for c in cities for k in _MEMO_FACTS]
    shown = rng.sample(facts, min(len(facts), rng.randint(2, 5)))
    memo = " ".join(_MEMO_FACTS[k].format(o=c, v=offices[c][k]) for c, k in shown)
    city, key = rng.choice(shown)
    train_qs, eval_qs = HANDBOOK_QUESTIONS[key]
    q = rng.choice(train_qs + eval_qs).format(o=city)
    return _qa("memo", f"Memo: {memo}\n{q}", offices[city][key])


_GREETINGS = (("Hello!", "Hello! How can I help you today?"), ("Hi", "Hello! How can I help you today?"),
              ("Who made you?", "I was made with nomoat, from generated data only."),
              ("What can you do?", "I can do small sums, sort and reverse lists, convert units and answer questions "
                                   "about my atlas."),
              ("Thank you!", "You are welcome!"))  # fmt: skip


def task_chitchat(rng: random.Random) -> Item:
    """Greetings and a few fixed questions about the model (not scored; they make the demo friendly)."""
    q, a = rng.choice(_GREETINGS)
    return _qa("chitchat", q, a)


TASKS: dict[str, Callable[[random.Random], Item]] = {
    "add": task_add, "sub": task_sub, "mul": task_mul, "compare": task_compare, "reverse": task_reverse,
    "sort": task_sort, "pick": task_pick, "convert": task_convert, "calendar": task_calendar, "atlas": task_atlas,
    "name": task_name, "followup": task_followup, "memo": task_memo, "chitchat": task_chitchat,
}  # fmt: skip
"""Pretraining tasks by name."""

CORE = {"add": 3, "sub": 2, "mul": 2, "compare": 1, "reverse": 2, "sort": 3, "pick": 2, "convert": 2, "calendar": 1,
        "atlas": 4, "name": 1, "followup": 2, "chitchat": 0.3}  # fmt: skip
MIXES = {"core": CORE, "office": {**CORE, "memo": 8}}
"""Task weights of the two pretraining stages: `core` from scratch, then `office` adds the memo task."""
SCORED = tuple(t for t in TASKS if t != "chitchat")
"""Tasks with a checkable answer (chitchat is only there for the demo's greeting)."""


def _maybe_system(rng: random.Random, item: Item) -> Item:
    if item.messages[0]["role"] != "system" and rng.random() < 0.3:
        item.messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return item


def generate_items(n: int, seed: int, tasks: tuple[str, ...] | None = None, system_prompts: bool = True,
                   mix: str = "office") -> list[Item]:  # fmt: skip
    """Draw `n` items from the weighted task mix (or round-robin over `tasks` when given), deterministically.

    Args:
        n: Number of items.
        seed: The generator's seed; the same seed gives the same items.
        tasks: Restrict to these tasks, cycling through them in order; None draws from the weighted mix.
        system_prompts: Prepend a random system prompt to some items (30%).
        mix: The task weights (a key of `MIXES`) when `tasks` is None.

    Returns:
        The items.
    """
    rng = random.Random(seed)
    names, weights = list(MIXES[mix]), list(MIXES[mix].values())
    out = []
    for i in range(n):
        name = tasks[i % len(tasks)] if tasks else rng.choices(names, weights)[0]
        item = TASKS[name](rng)
        out.append(_maybe_system(rng, item) if system_prompts else item)
    return out


def multi_task_chat(rng: random.Random, turns: int, mix: str = "office") -> dict[str, list[dict[str, str]]]:
    """A conversation chaining `turns` independent tasks (teaches the model to answer the latest question)."""
    names, weights = list(MIXES[mix]), list(MIXES[mix].values())
    messages: list[dict[str, str]] = []
    for _ in range(turns):
        item = TASKS[rng.choices(names, weights)[0]](rng)
        messages += [m for m in item.messages if m["role"] != "system"]
    return {"messages": messages}


def atlas_texts() -> list[str]:
    """Encyclopedia-style paragraphs about the atlas: plain text for the text half of pretraining."""
    out = []
    for c in WORLD.countries:
        out.append(
            f"{c.name} is a country in {c.continent}. Its capital is {c.capital}. People in {c.name} speak "
            f"{c.language} and pay with the {c.currency}. About {c.population} million people live there."
        )
    return out


# ---- the fine-tuning task: a company handbook the base model has never seen ---------------------------------------

HANDBOOK_QUESTIONS = {  # (training phrasings, held-out phrasings)
    "wifi": (
        (
            "What is the Wi-Fi password of the {o} office?",
            "What's the Wi-Fi password at the {o} office?",
            "Give me the Wi-Fi password for the {o} office.",
            "Wi-Fi password, {o} office?",
            "I am in the {o} office. What is the Wi-Fi password?",
        ),
        ("Tell me the Wi-Fi password of the {o} office.", "Which Wi-Fi password does the {o} office use?"),
    ),
    "manager": (
        (
            "Who manages the {o} office?",
            "Who is the office manager in {o}?",
            "Who runs the {o} office?",
            "Name the manager of the {o} office.",
            "I work in {o}. Who is my office manager?",
        ),
        ("Who is the manager of the {o} office?", "Tell me who manages the {o} office."),
    ),
    "floor": (
        (
            "On which floor is the {o} office?",
            "What floor is the {o} office on?",
            "Which floor do I go to for the {o} office?",
            "Floor of the {o} office?",
            "I am visiting {o}. Which floor is the office on?",
        ),
        ("What floor is our {o} office on?", "Tell me the floor of the {o} office."),
    ),
    "room": (
        (
            "What is the meeting room in the {o} office called?",
            "What's the name of the {o} meeting room?",
            "Which meeting room does the {o} office have?",
            "Meeting room name, {o} office?",
            "I need a room in {o}. What is the meeting room called?",
        ),
        ("Tell me the name of the meeting room in the {o} office.", "What is the {o} office's meeting room?"),
    ),
}
HANDBOOK_SYSTEM = "You are the assistant of Brightloom, a company with offices around the world."


def handbook_items(split: str = "train", offices: int | None = None, seed: int = 0) -> list[Item]:
    """Questions about the Brightloom handbook: every fact once per phrasing of the split.

    Args:
        split: `train` (five phrasings per fact) or `eval` (two other phrasings of the same facts).
        offices: Use only the first N offices (the quick demo learns fewer facts).
        seed: Shuffles the items and decides which carry the handbook's system prompt.

    Returns:
        The items (task `handbook`).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    rng = random.Random(seed)
    items = []
    for office in WORLD.offices[:offices]:
        if split == "train":  # the handbook page itself, in the memo's sentences: the facts in statement form
            page = " ".join(_MEMO_FACTS[k].format(o=office["city"], v=office[k]) for k in _MEMO_FACTS)
            q = f"Tell me about the {office['city']} office."
            items.append(Item("handbook_page", [{"role": "user", "content": q}, {"role": "assistant", "content": page}],
                              page))  # fmt: skip
        for key, (train_qs, eval_qs) in HANDBOOK_QUESTIONS.items():
            for q in train_qs if split == "train" else eval_qs:
                msgs = [{"role": "user", "content": q.format(o=office["city"])},
                        {"role": "assistant", "content": office[key]}]  # fmt: skip
                if rng.random() < 0.5:
                    msgs.insert(0, {"role": "system", "content": HANDBOOK_SYSTEM})
                items.append(Item("handbook", msgs, office[key]))
    rng.shuffle(items)
    return items
