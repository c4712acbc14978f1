"""Simple chat instructions for calibration, self-distillation data and generation checks.

An instruct model is served in its chat template, so the projections should see chat-formatted
text; the model's own greedy answers to these instructions are in-distribution for a
self-distillation whose teacher is that same model.  The instructions are built from templates
and filler lists; the ``training`` and ``heldout`` splits share no filler value, so no held-out
prompt (nor its subject) is seen in training.  Deterministic: the same lists every call.
"""

from __future__ import annotations

import hashlib
import itertools

SPLITS = ("training", "heldout")

# (template, filler list name).  Every template reads naturally with every value of its list.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What is the capital of {}?", "countries"),
    ("Tell me one interesting fact about {}.", "countries"),
    ("Describe {} in two sentences.", "animals"),
    ("Where does {} live, and what does it eat?", "animals"),
    ("Explain {} to a ten-year-old.", "concepts"),
    ("What is {}? Answer briefly.", "concepts"),
    ("Give me three tips for {}.", "activities"),
    ("Why is {} good for your health?", "activities"),
    ("Write a short poem about {}.", "things"),
    ("Write one sentence that uses the word \"{}\".", "words"),
    ("What is the opposite of \"{}\"?", "words"),
    ("Translate \"{}\" into French.", "phrases"),
    ("Translate \"{}\" into Spanish.", "phrases"),
    ("What is {}?", "sums"),
    ("Who was {}?", "people"),
    ("Suggest a name for {}.", "names_for"),
    ("How do I {}?", "howto"),
)

_FILLERS: dict[str, tuple[str, ...]] = {
    "countries": (
        "France", "Japan", "Brazil", "Canada", "Kenya", "Italy", "India", "Mexico", "Egypt", "Norway",
        "Australia", "Germany", "Spain", "Peru", "Vietnam", "Sweden", "Ghana", "Chile", "Greece", "Turkey",
        "Poland", "Ireland", "Thailand", "Portugal", "Argentina", "Morocco", "Finland", "Nepal",
        "Cuba", "Iceland", "Austria", "Colombia", "Denmark", "Ethiopia",
    ),
    "animals": (
        "a penguin", "an elephant", "a honeybee", "a dolphin", "a red fox", "an octopus", "a giraffe",
        "a koala", "a bald eagle", "a sea turtle", "a polar bear", "a frog", "a camel", "a wolf",
        "an owl", "a panda", "a kangaroo", "a salmon", "a bat", "a hedgehog", "a zebra", "a parrot",
        "a beaver", "a shark", "a tiger", "a snail",
    ),
    "concepts": (
        "gravity", "photosynthesis", "inflation", "democracy", "a rainbow", "the water cycle",
        "electricity", "a volcano", "the internet", "a vaccine", "an eclipse", "recycling",
        "a budget", "friction", "a calendar", "the seasons", "a map", "an election", "a fossil",
        "a magnet", "a thermometer", "an earthquake", "a library", "a tax", "the moon's phases",
    ),
    "activities": (
        "running", "swimming", "cooking at home", "learning a language", "gardening", "cycling",
        "reading before bed", "walking every day", "saving money", "studying for an exam", "yoga",
        "making new friends", "camping", "painting",
    ),
    "things": (
        "the ocean", "autumn leaves", "a city at night", "the moon", "a cup of tea", "snow",
        "an old library", "a summer storm", "the mountains", "a train journey", "a garden",
        "the first day of school",
    ),
    "words": (
        "happy", "bright", "quick", "ancient", "gentle", "brave", "empty", "loud", "strong", "early",
        "heavy", "rich", "warm", "simple", "wide", "honest",
    ),
    "phrases": (
        "good morning", "thank you very much", "where is the station", "I like to read", "the cat is black",
        "see you tomorrow", "how much does it cost", "I am hungry", "it is raining", "my name is Anna",
        "the book is on the table", "we are friends",
    ),
    "sums": tuple(f"{a} times {b}" for a, b in ((7, 8), (6, 9), (12, 4), (3, 15), (9, 9), (11, 6), (8, 5),
                                                  (4, 13), (7, 7), (14, 3), (5, 12), (6, 6)))
    + tuple(f"{a} plus {b}" for a, b in ((25, 17), (48, 36), (120, 80), (9, 14), (63, 29), (15, 85))),
    "people": (
        "Albert Einstein", "Marie Curie", "Leonardo da Vinci", "Abraham Lincoln", "William Shakespeare",
        "Isaac Newton", "Jane Austen", "Nelson Mandela", "Charles Darwin", "Ada Lovelace",
        "Mahatma Gandhi", "Wolfgang Amadeus Mozart", "Florence Nightingale", "Galileo Galilei",
    ),
    "names_for": (
        "a bakery", "a pet goldfish", "a soccer team", "a coffee shop", "a sailing boat", "a robot",
        "a book club", "a garden cafe", "a kitten", "a hiking group",
    ),
    "howto": (
        "boil an egg", "change a flat tire", "plant a tree", "write a good email", "make a paper airplane",
        "fall asleep faster", "clean a laptop keyboard", "start a vegetable garden", "tie a tie",
        "make pancakes", "prepare for a job interview", "learn to juggle", "bake bread",
        "fix a squeaky door", "read a map", "keep a houseplant alive",
    ),
}


def _is_heldout(list_name: str, value: str) -> bool:
    """Every third filler value (by a stable hash) is held out, whatever the template."""
    digest = hashlib.sha256(f"{list_name}:{value}".encode()).digest()
    return digest[0] % 3 == 0


def instructions(split: str = "training") -> list[str]:
    """The instructions of a split (``training``: ~270, ``heldout``: ~120), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown instruction split {split!r}; choose one of {', '.join(SPLITS)}")
    want_heldout = split == "heldout"
    out = []
    for template, list_name in _TEMPLATES:
        for value in _FILLERS[list_name]:
            if _is_heldout(list_name, value) == want_heldout:
                out.append(template.format(value))
    # Interleave the templates so that any prefix of the list covers them all.
    by_template: dict[str, list[str]] = {}
    for template, _ in _TEMPLATES:
        by_template[template] = [p for p in out if _matches(template, p)]
    mixed = [p for group in itertools.zip_longest(*by_template.values()) for p in group if p is not None]
    seen: set[str] = set()
    return [p for p in mixed if not (p in seen or seen.add(p))]


def _matches(template: str, prompt: str) -> bool:
    head, _, tail = template.partition("{}")
    return prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail)
