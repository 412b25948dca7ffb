"""Four generated tasks for the quality benchmark: arithmetic, word reversal, JSON extraction,
sentiment.

Why generated: the benchmark must run offline and deterministically on a 2-core machine, with
answers short enough that a tiny model learns them in a minute. Why these four: they need
different skills (carrying digits, copying in reverse, copying into a fixed structure, a
lexicon decision), so experts fine-tuned on each really do differ and averaging them costs
accuracy — the situation Mediator is for.

Prompts are *not* separable by a fixed prefix: each task has six phrasings, the tasks share
vocabulary (names and numbers appear in arithmetic and extraction; the same nouns and
adjectives in reversal and sentiment), and all tasks end with the same randomly chosen answer
cue (``Answer:``, ``Output:`` or ``A:``). A router has to read the request.

Evaluation splits:

* ``test``: held-out examples in the six training phrasings (in distribution).
* ``ood``: held-out examples in two *unseen* phrasings per task, written in the style of another
  task (e.g. an arithmetic problem introduced with extraction's "Extract …", a sentiment note
  phrased as a "How did it go" question). Never used for training or calibration.
* ``mixed``: two prompts of different tasks concatenated (the first without its answer cue);
  an answer is correct if it equals *either* task's answer.

Every split is a pure function of (task, split, n, seed); ``train``/``calibration`` never
contain a prompt of ``test`` or ``ood``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("arithmetic", "reverse", "extract", "sentiment")
SPLITS: tuple[str, ...] = ("train", "calibration", "test", "ood")
CUES: tuple[str, ...] = ("Answer:", "Output:", "A:")

# fmt: off
NAMES = ("Ana", "Ben", "Carla", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jon", "Kim",
         "Leo", "Mia", "Nora", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vera", "Yuki")
ITEMS = ("apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps", "cups",
         "boxes", "stones", "tickets")
CITIES = ("Rome", "Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin",
          "Seoul", "Quito", "Riga")
NOUNS = ("food", "room", "staff", "movie", "music", "service", "view", "bed", "coffee", "show",
         "hotel", "trip", "book", "game", "car", "park")
POSITIVE = ("great", "lovely", "excellent", "wonderful", "friendly", "perfect", "amazing",
            "pleasant", "superb", "delightful")
NEGATIVE = ("awful", "terrible", "rude", "dirty", "boring", "horrible", "noisy", "poor",
            "disappointing", "dreadful")
# fmt: on
WORDS = NOUNS + POSITIVE[:5] + NEGATIVE[:5] + ("sun", "tree", "river", "cloud", "stone", "bird")


@dataclass(frozen=True)
class Example:
    """One prompt with its accepted answers (usually one; ``mixed`` prompts accept two)."""

    task: str
    prompt: str
    answers: tuple[str, ...]
    template: int

    @property
    def answer(self) -> str:
        """The training target (the first accepted answer)."""
        return self.answers[0]


def normalize(text: str) -> str:
    """What exact match compares: surrounding whitespace and inner runs of it do not count."""
    return " ".join(text.split())


def score(prediction: str, example: Example) -> bool:
    """Exact match against any accepted answer (after :func:`normalize`)."""
    guess = normalize(prediction)
    return any(guess == normalize(a) for a in example.answers)


# --------------------------------------------------------------------------- generators
# Each returns (text without the answer cue, answer) for a template index.


def _arithmetic(rng: random.Random, template: int) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    # A two-digit and a one-digit number: carrying and borrowing, yet learnable by a
    # one-million-parameter model in a few hundred steps.
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    texts = [
        f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        f"{name} had {a} {item} but lost {b} of them. How many {item} are left?",
        f"Please work out how many {item} there are if one box has {a} and another has {b}.",
        f"There were {a} {item} on the shelf and {b} were sold. How many {item} remain?",
        f"Here is a small problem: {a} {item} plus {b} {item} makes how many?",
        f"A farmer picks {a} {item} in the morning and {b} later. What is the total?",
        # ood: extraction's and sentiment's styles
        f"Extract the total count as a number: {name} bought {a} {item}, then {b} more.",
        f"{name} wrote: I found {a} {item} today and {b} yesterday. How many in all?",
    ]
    result = a - b if template in (1, 3) else a + b
    return texts[template], str(result)


def _reverse(rng: random.Random, template: int) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    w, name = " ".join(words), rng.choice(NAMES)
    texts = [
        f"Reverse the order of these words: {w}.",
        f"Write {w} backwards, word by word.",
        f"Please put the words in reverse order: {w}",
        f"Here are some words: {w}. List them from last to first.",
        f"{name} wrote '{w}'. What does it read with the word order flipped?",
        f"Take the list {w} and turn it around.",
        # ood: extraction's and sentiment's styles
        f"Extract the words in reverse order from: {w}.",
        f"Review these words and give them last to first: {w}",
    ]
    return texts[template], " ".join(reversed(words))


def _extract(rng: random.Random, template: int) -> tuple[str, str]:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
    texts = [
        f"Extract name and age as JSON: {name} is {age} years old and lives in {city}.",
        f"{name}, aged {age}, moved to {city} last year. Give the JSON with name and age.",
        f"Please fill the record (name, age) for: {name} from {city}, {age} years old.",
        f"Here is a profile: {city} resident {name} turned {age} this spring. JSON please.",
        f"Meet {name} ({age}) from {city}. Return name and age in JSON.",
        f"Our new member {name} is {age}. Output a JSON object with name and age.",
        # ood: arithmetic's and sentiment's styles
        f"{name} has {age} candles on the cake in {city}. How would you write name and age "
        "as JSON?",
        f"Review of a guest: {name}, {age}, stayed in {city}. Give name and age as JSON.",
    ]
    return texts[template], json.dumps({"name": name, "age": age})


def _sentiment(rng: random.Random, template: int) -> tuple[str, str]:
    positive = rng.random() < 0.5
    pool = POSITIVE if positive else NEGATIVE
    adj1, adj2 = rng.sample(pool, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    name = rng.choice(NAMES)
    texts = [
        f"Review: the {noun} was {adj1} and the {noun2} was {adj2}. Positive or negative?",
        f"{name} said the {noun} was {adj1}. Was that positive or negative?",
        f"Please classify the sentiment: {noun} {adj1}, {noun2} {adj2}.",
        f"Here is what a guest wrote: the {noun} felt {adj1}. Sentiment?",
        f"The {noun} was {adj1}, and the {noun2} was {adj2} too. Label it positive or negative.",
        f"Customer note about the {noun}: {adj1}. Is the tone positive or negative?",
        # ood: extraction's and arithmetic's styles
        f"Extract the sentiment, positive or negative: the {noun} was {adj1}.",
        f"{name} had a {adj1} {noun} and a {adj2} {noun2}. How did it go, positive or negative?",
    ]
    return texts[template], "positive" if positive else "negative"


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "extract": _extract,
    "sentiment": _sentiment,
}
ID_TEMPLATES = range(6)
OOD_TEMPLATES = range(6, 8)


def _with_cue(text: str, rng: random.Random) -> str:
    return f"{text}\n{rng.choice(CUES)}"


def _draw(task: str, templates: Sequence[int], rng: random.Random) -> Example:
    template = rng.choice(list(templates))
    text, answer = GENERATORS[task](rng, template)
    return Example(task, _with_cue(text, rng), (" " + answer,), template)


def _unique(
    task: str, templates: Sequence[int], n: int, seed: str, exclude: set[str]
) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    seen = set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"cannot draw {n} distinct {task} prompts for {seed}")
        example = _draw(task, templates, rng)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


@dataclass(frozen=True)
class SplitSizes:
    """Examples per task and split (the defaults fit a tiny model on 2 cores)."""

    train: int = 3000
    calibration: int = 100
    test: int = 200
    ood: int = 100
    mixed: int = 200


def make_splits(task: str, sizes: SplitSizes = SplitSizes(), seed: int = 0) -> dict[str, list]:
    """``{split: [Example]}`` for one task; evaluation prompts never leak into train/calibration.

    Evaluation splits are drawn first, each from its own seeded stream, so growing the
    training set never changes the test set."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r} (have {list(GENERATORS)})")
    test = _unique(task, ID_TEMPLATES, sizes.test, f"{seed}/{task}/test", set())
    ood = _unique(task, OOD_TEMPLATES, sizes.ood, f"{seed}/{task}/ood", set())
    held = {e.prompt for e in test + ood}
    calibration = _unique(task, ID_TEMPLATES, sizes.calibration, f"{seed}/{task}/calibration", held)
    held |= {e.prompt for e in calibration}
    train = _unique(task, ID_TEMPLATES, sizes.train, f"{seed}/{task}/train", held)
    return {"train": train, "calibration": calibration, "test": test, "ood": ood}


def mixed_examples(
    splits: dict[str, dict[str, list[Example]]], n: int, seed: int = 0
) -> list[Example]:
    """Two-task concatenations of *test* prompts; either task's answer counts as correct."""
    rng = random.Random(f"{seed}/mixed")
    tasks = sorted(splits)
    out = []
    for _ in range(n):
        first, second = rng.sample(tasks, 2)
        a, b = rng.choice(splits[first]["test"]), rng.choice(splits[second]["test"])
        lead = a.prompt.rsplit("\n", 1)[0]
        out.append(Example(f"{first}+{second}", f"{lead} {b.prompt}", a.answers + b.answers, -1))
    return out


@dataclass(frozen=True)
class TaskSuite:
    """All four tasks' splits plus the mixed split, generated once for a seed."""

    tasks: tuple[str, ...]
    splits: dict[str, dict[str, list[Example]]]
    mixed: list[Example]
    sizes: SplitSizes
    seed: int

    def pairs(self, task: str, split: str = "train") -> list[tuple[str, str]]:
        """(prompt, answer) pairs for fine-tuning."""
        return [(e.prompt, e.answer) for e in self.splits[task][split]]

    def prompts(self, task: str, split: str) -> list[str]:
        return [e.prompt for e in self.splits[task][split]]

    def corpus(self) -> list[str]:
        """Every train/calibration prompt and answer: the text a tokenizer is trained on."""
        return [
            e.prompt + e.answer
            for t in self.tasks
            for s in ("train", "calibration")
            for e in self.splits[t][s]
        ]


def build_suite(
    sizes: SplitSizes = SplitSizes(), seed: int = 0, tasks: Sequence[str] = TASKS
) -> TaskSuite:
    splits = {t: make_splits(t, sizes, seed) for t in tasks}
    return TaskSuite(tuple(tasks), splits, mixed_examples(splits, sizes.mixed, seed), sizes, seed)
