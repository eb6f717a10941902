"""A synthetic ScienceQA-style world: deterministic, offline, small images that the questions depend on.

``synth_sqa(out_dir, n, seed)`` writes ScienceQA's layout (``problems.json``, ``pid_splits.json``,
``images/<split>/<pid>/image.png``), caption pairs (``captions.json``, LLaVA pretraining layout, images under
``images/``), preference pairs (``preference.json``, RLAIF-V style) and a tokenizer folder (``tokenizer/``).

Question families (each a template; the answer of an image question is drawn uniformly, independently of its text,
so a model that ignores the image is at chance on them):

* image, natural science: count shapes, name a colour, name a shape, left/right or top/bottom position;
* image, social science: tallest/shortest bar of a bar chart (with a hint), farthest north/south/east/west city on a
  grid map with a compass rose;
* text only: animal classes, conductors, elements vs compounds (natural science), dictionary guide words and word
  classes (language science), and questions answered from the hint (arithmetic, reading a short context).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmkd.data.scienceqa import letters, render_sqa_prompt
from mmkd.data.tokenizer import BUILTIN_CORPUS, build_tokenizer

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANIMALS = {
    "mammal": ["dog", "cat", "horse", "whale", "bat", "cow", "lion", "rabbit", "sheep", "goat"],
    "bird": ["robin", "eagle", "penguin", "owl", "sparrow", "duck", "parrot", "crow", "swan", "hawk"],
    "fish": ["salmon", "trout", "shark", "tuna", "cod", "goldfish", "carp", "eel", "perch", "herring"],
    "reptile": ["snake", "lizard", "turtle", "crocodile", "gecko", "iguana", "tortoise", "cobra", "python", "skink"],
}
CONDUCTORS = ["copper wire", "iron nail", "steel spoon", "aluminum foil", "silver ring", "gold coin"]
INSULATORS = ["rubber band", "glass marble", "wooden ruler", "plastic cup", "cotton sock", "paper bag", "clay pot"]
ELEMENTS = ["oxygen", "carbon", "iron", "helium", "neon", "sulfur", "copper", "zinc", "silicon", "gold"]
COMPOUNDS = ["water", "table salt", "carbon dioxide", "ammonia", "methane", "baking soda", "rust", "sugar"]
WORDS = sorted(
    "apple baker candle dinner eagle fabric garden harbor island jacket kettle lemon magnet napkin orange pepper"
    " quilt rabbit saddle tablet umbrella violin wagon yellow zipper anchor button cactus donkey engine feather"
    " ginger hammer insect jungle kitten ladder meadow needle oyster pillow rocket silver timber valley window".split()
)
WORD_CLASSES = {
    "noun": ["table", "river", "teacher", "pencil", "mountain", "kitchen", "garden", "bottle"],
    "verb": ["run", "jump", "write", "sing", "climb", "swim", "build", "read"],
    "adjective": ["happy", "tall", "bright", "quiet", "soft", "green", "brave", "cold"],
}
NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Yuki", "Ben"]
PLACES = ["a farm", "a city", "a village", "an island", "the mountains", "the desert", "a forest", "the coast"]
THINGS = ["apples", "marbles", "stickers", "books", "shells", "pencils"]
_SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}


@dataclass
class Item:
    """One generated problem before it is written: ScienceQA fields, its scene (None: text only) and its texts."""

    problem: dict[str, Any]
    scene: dict[str, Any] | None = None
    caption: str = ""
    rejected: str = ""
    template: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- templates ---------------------------------------------------------------------------------------------------


def _choices(rng: random.Random, answer: str, pool: list[str], k: int, ordered: bool = False) -> tuple[list[str], int]:
    """``k`` options: the answer plus ``k-1`` others from ``pool``, shuffled (or in ``pool`` order)."""
    others = rng.sample([p for p in pool if p != answer], k - 1)
    options = [answer, *others]
    if ordered:
        options.sort(key=pool.index)
    else:
        rng.shuffle(options)
    return options, options.index(answer)


def _item(
    rng: random.Random,
    template: str,
    subject: str,
    grades: tuple[int, int],
    question: str,
    options: list[str],
    answer: int,
    *,
    topic: str,
    category: str,
    skill: str,
    lecture: str,
    solution: Callable[[str], str],
    hint: str = "",
    scene: dict[str, Any] | None = None,
    caption: str = "",
) -> Item:
    wrong = rng.choice([o for i, o in enumerate(options) if i != answer])
    problem = {
        "question": question,
        "choices": options,
        "answer": answer,
        "hint": hint,
        "image": "image.png" if scene is not None else None,
        "task": "closed choice",
        "grade": f"grade{rng.randint(*grades)}",
        "subject": _SUBJECTS[subject],
        "topic": topic,
        "category": category,
        "skill": skill,
        "lecture": lecture,
        "solution": solution(options[answer]),
    }
    rejected = f"{solution(wrong)} The answer is {letters(len(options))[options.index(wrong)]}."
    return Item(problem, scene, caption, rejected, template)


def _cells(rng: random.Random, k: int, grid: int = 3) -> list[tuple[int, int]]:
    return rng.sample([(r, c) for r in range(grid) for c in range(grid)], k)


def _count(rng: random.Random) -> Item:
    shape, k = rng.choice(SHAPES), rng.randint(1, 5)
    objs = [{"shape": shape, "colour": rng.choice(list(COLOURS)), "cell": cell, "grid": 3} for cell in _cells(rng, k)]
    pool = [str(i) for i in range(1, 7)]
    options, answer = _choices(rng, str(k), pool, 4, ordered=True)
    return _item(
        rng, "count", "NAT", (1, 3), f"How many {shape}s are in the picture?", options, answer,
        topic="units-and-measurement", category="Counting", skill="Count shapes in a picture",
        lecture="To count objects, point to each one once and say the next number.",
        solution=lambda o, s=shape: f"Count the {s}s in the picture. There are {o} {s}s.",
        scene={"kind": "shapes", "objects": objs},
        caption=f"{NUMBER_WORDS[k].capitalize()} {shape}{'s' if k > 1 else ''} on a white background.",
    )  # fmt: skip


def _colour(rng: random.Random) -> Item:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    options, answer = _choices(rng, colour, list(COLOURS), 3)
    return _item(
        rng, "colour", "NAT", (1, 2), f"What colour is the {shape}?", options, answer,
        topic="physics", category="Colours", skill="Identify colours",
        lecture="Colour is a property of an object. Red, green and blue are colours.",
        solution=lambda o, s=shape: f"Look at the {s}. The {s} is {o}.",
        scene={"kind": "shapes", "objects": [{"shape": shape, "colour": colour, "cell": (1, 1), "grid": 3}]},
        caption=f"A {colour} {shape} in the middle of the picture.",
    )  # fmt: skip


def _shape(rng: random.Random) -> Item:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    options, answer = _choices(rng, shape, list(SHAPES), 3)
    return _item(
        rng, "shape", "NAT", (1, 3), "Which shape is shown in the picture?", options, answer,
        topic="physics", category="Shapes", skill="Identify shapes",
        lecture="A shape is the outline of an object. A circle is round; a square has four equal sides.",
        solution=lambda o: f"Look at the outline. The shape is a {o}.",
        scene={"kind": "shapes", "objects": [{"shape": shape, "colour": colour, "cell": _cells(rng, 1)[0], "grid": 3}]},
        caption=f"A {colour} {shape}.",
    )  # fmt: skip


def _position(rng: random.Random) -> Item:
    shape_a, shape_b = rng.sample(SHAPES, 2)
    colour_a, colour_b = rng.sample(list(COLOURS), 2)
    axis = rng.choice(["horizontal", "vertical"])
    sides = ["left", "right"] if axis == "horizontal" else ["top", "bottom"]
    side = rng.randrange(2)
    line = rng.randrange(2)
    cell_a = (line, side) if axis == "horizontal" else (side, line)
    cell_b = (line, 1 - side) if axis == "horizontal" else (1 - side, line)
    objs = [
        {"shape": shape_a, "colour": colour_a, "cell": cell_a, "grid": 2},
        {"shape": shape_b, "colour": colour_b, "cell": cell_b, "grid": 2},
    ]
    options = [f"on the {s}" for s in sides]
    return _item(
        rng, "position", "NAT", (1, 4), f"Where is the {colour_a} {shape_a}?", options, side,
        topic="physics", category="Position", skill="Describe positions: left, right, top, bottom",
        lecture="Position words tell where an object is: left, right, top and bottom.",
        solution=lambda o, a=f"{colour_a} {shape_a}": f"Look at the picture. The {a} is {o}.",
        scene={"kind": "shapes", "objects": objs},
        caption=f"A {colour_a} {shape_a} {options[side]} and a {colour_b} {shape_b} {options[1 - side]}.",
    )  # fmt: skip


def _bars(rng: random.Random) -> Item:
    k = rng.randint(3, 4)
    colours = rng.sample(list(COLOURS), k)
    heights = rng.sample(range(2, 10), k)
    which = rng.choice(["tallest", "shortest"])
    target = colours[heights.index(max(heights) if which == "tallest" else min(heights))]
    thing = rng.choice(THINGS)
    options, answer = _choices(rng, target, colours, k)
    hint = f"The bar chart shows how many {thing} each team collected. Each bar has its own colour."
    return _item(
        rng, "bars", "SOC", (3, 12), f"Which team's bar is the {which}?", options, answer,
        topic="economics", category="Data and graphs", skill="Read a bar chart",
        lecture="A bar chart compares amounts. A taller bar means a larger amount.",
        solution=lambda o, w=which: f"Compare the heights of the bars. The {o} bar is the {w}.",
        hint=hint, scene={"kind": "bars", "colours": colours, "heights": heights},
        caption=f"A bar chart with {NUMBER_WORDS[k]} bars; the {target} bar is the {which}.",
    )  # fmt: skip


def _map(rng: random.Random) -> Item:
    k = rng.randint(3, 4)
    colours = rng.sample(list(COLOURS), k)
    rows, cols = rng.sample(range(4), k), rng.sample(range(4), k)
    direction = rng.choice(["north", "south", "east", "west"])
    key = {"north": rows, "south": [-r for r in rows], "west": cols, "east": [-c for c in cols]}[direction]
    target = colours[key.index(min(key))]
    options, answer = _choices(rng, f"the {target} city", [f"the {c} city" for c in colours], k)
    return _item(
        rng, "map", "SOC", (2, 8), f"Which city is farthest {direction}?", options, answer,
        topic="geography", category="Geography", skill="Read a map: cardinal directions",
        lecture="A compass rose shows the cardinal directions. The north arrow points north; on this map north is up.",
        solution=lambda o, d=direction: f"Use the compass rose. {o.capitalize()} is farthest {d}.",
        scene={"kind": "map", "colours": colours, "cells": list(zip(rows, cols))},
        caption=f"A grid map with a compass rose and {NUMBER_WORDS[k]} cities; {options[answer]} is farthest"
        f" {direction}.",
    )  # fmt: skip


def _animals(rng: random.Random) -> Item:
    cls = rng.choice(list(ANIMALS))
    right = rng.choice(ANIMALS[cls])
    others = [rng.choice(ANIMALS[c]) for c in rng.sample([c for c in ANIMALS if c != cls], 2)]
    options = [right, *others]
    rng.shuffle(options)
    return _item(
        rng, "animals", "NAT", (2, 6), f"Which animal is a {cls}?", options, options.index(right),
        topic="biology", category="Classification", skill="Identify mammals, birds, fish and reptiles",
        lecture="Mammals have fur and feed milk to their young. Birds have feathers. Fish live in water and have gills."
        " Reptiles have scaly skin.",
        solution=lambda o, c=cls: f"A {o} is {'a ' + c if o in ANIMALS[c] else 'not a ' + c}.",
    )  # fmt: skip


def _conductor(rng: random.Random) -> Item:
    good = rng.random() < 0.5
    right = rng.choice(CONDUCTORS if good else INSULATORS)
    others = rng.sample(INSULATORS if good else CONDUCTORS, 2)
    options = [right, *others]
    rng.shuffle(options)
    kind = "conductor" if good else "insulator"
    return _item(
        rng, "conductor", "NAT", (6, 10), f"Which object is a better electrical {kind}?", options, options.index(right),
        topic="physics", category="Materials", skill="Identify electrical conductors and insulators",
        lecture="Metals such as copper, iron and silver are good conductors. Rubber, glass, wood, plastic and paper"
        " are insulators.",
        solution=lambda o, k=kind: f"The {o} is {'made of metal' if o in CONDUCTORS else 'not made of metal'}, so"
        f" it is {'a good' if (o in CONDUCTORS) == (k == 'conductor') else 'a poor'} {k}.",
    )  # fmt: skip


def _element(rng: random.Random) -> Item:
    want = rng.choice(["an elementary substance", "a compound"])
    pool_right, pool_wrong = (ELEMENTS, COMPOUNDS) if want.startswith("an") else (COMPOUNDS, ELEMENTS)
    right = rng.choice(pool_right)
    options = [right, *rng.sample(pool_wrong, rng.randint(1, 2))]
    rng.shuffle(options)
    return _item(
        rng, "element", "NAT", (8, 12), f"Which substance is {want}?", options, options.index(right),
        topic="chemistry", category="Atoms and molecules", skill="Identify elementary substances and compounds",
        lecture="An elementary substance is made of one chemical element. A compound is made of two or more"
        " elements bonded together.",
        solution=lambda o: f"{o.capitalize()} is {'an elementary substance' if o in ELEMENTS else 'a compound'}.",
    )  # fmt: skip


def _dictionary(rng: random.Random) -> Item:
    i = rng.randrange(0, len(WORDS) - 8)
    lo, hi = WORDS[i], WORDS[i + rng.randint(3, 7)]
    inside = rng.choice(WORDS[i + 1 : WORDS.index(hi)])
    outside = rng.choice(WORDS[:i] + WORDS[WORDS.index(hi) + 1 :])
    options = [inside, outside]
    rng.shuffle(options)
    return _item(
        rng, "dictionary", "LAN", (2, 8),
        f"Which word would you find on a dictionary page with the following guide words?\n{lo} - {hi}",
        options, options.index(inside),
        topic="reference-skills", category="Reference skills", skill="Use guide words",
        lecture="Guide words are the first and last words on a dictionary page. Words on the page are in"
        " alphabetical order between them.",
        solution=lambda o, a=lo, b=hi: f"{o.capitalize()} is {'between' if a < o < b else 'not between'} {a} and {b}"
        " in alphabetical order.",
    )  # fmt: skip


def _word_class(rng: random.Random) -> Item:
    cls = rng.choice(list(WORD_CLASSES))
    right = rng.choice(WORD_CLASSES[cls])
    others = [rng.choice(WORD_CLASSES[c]) for c in WORD_CLASSES if c != cls]
    options = [right, *others]
    rng.shuffle(options)
    return _item(
        rng, "word_class", "LAN", (3, 9), f"Which word is a {cls}?", options, options.index(right),
        topic="grammar", category="Parts of speech", skill="Identify nouns, verbs and adjectives",
        lecture="A noun names a person, place or thing. A verb tells an action. An adjective describes a noun.",
        solution=lambda o, c=cls: f"{o.capitalize()} is {'a ' + c if o in WORD_CLASSES[c] else 'not a ' + c}.",
    )  # fmt: skip


def _sum_hint(rng: random.Random) -> Item:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, 6), rng.randint(1, 6)
    total = a + b
    options, answer = _choices(rng, str(total), [str(i) for i in range(2, 13)], 4, ordered=True)
    return _item(
        rng, "sum_hint", "NAT", (1, 4), f"How many {thing} does {name} have in all?", options, answer,
        topic="units-and-measurement", category="Addition", skill="Add two numbers from a story",
        lecture="To find how many in all, add the numbers together.",
        solution=lambda o, x=a, y=b: f"Add {x} and {y}. {name} has {o} {thing} in all.",
        hint=f"{name} has {a} red {thing} and {b} blue {thing}.",
    )  # fmt: skip


def _reading_hint(rng: random.Random) -> Item:
    name = rng.choice(NAMES)
    place = rng.choice(PLACES)
    options, answer = _choices(rng, place, PLACES, 3)
    return _item(
        rng, "reading_hint", "SOC", (3, 12), f"Where does {name} live?", options, answer,
        topic="civics", category="Reading", skill="Find details in a text",
        lecture="Read the text carefully. The answer to a question is often stated in the text.",
        solution=lambda o, n=name: f"The text says that {n} lives in {o}.",
        hint=f"{name} lives in {place}. Every morning {name} walks to school with a friend.",
    )  # fmt: skip


# -- fixed-option variants (``fixed_options=True``) ---------------------------------------------------------------
# Each family always shows the same option list in the same order, so an answer letter is a fixed function of the
# content (a colour, a count, an animal's class): a model has to learn the content, not a per-question lookup of
# which option line holds it. Image answers are still drawn independently of the question text.

FIXED_COLOURS = ["red", "green", "blue", "yellow", "purple"]  # colour family: 5 of the 6 colours
FIXED_BAR_COLOURS = ["red", "green", "blue", "yellow"]  # bars and map: always these 4, in shuffled places
FIXED_ANIMAL_GROUPS = ["mammals", "birds", "fish", "reptiles"]
FIXED_WORD_CLASSES = ["a noun", "a verb", "an adjective"]
FIXED_PLACES = PLACES[:5]


def _count_fixed(rng: random.Random) -> Item:
    shape, k = rng.choice(SHAPES), rng.randint(1, 5)
    objs = [{"shape": shape, "colour": rng.choice(list(COLOURS)), "cell": cell, "grid": 3} for cell in _cells(rng, k)]
    options = [str(i) for i in range(1, 6)]
    return _item(
        rng, "count", "NAT", (1, 3), f"How many {shape}s are in the picture?", options, k - 1,
        topic="units-and-measurement", category="Counting", skill="Count shapes in a picture",
        lecture="To count objects, point to each one once and say the next number.",
        solution=lambda o, s=shape: f"Count the {s}s in the picture. There are {o} {s}s.",
        scene={"kind": "shapes", "objects": objs},
        caption=f"{NUMBER_WORDS[k].capitalize()} {shape}{'s' if k > 1 else ''} on a white background.",
    )  # fmt: skip


def _colour_fixed(rng: random.Random) -> Item:
    shape, colour = rng.choice(SHAPES), rng.choice(FIXED_COLOURS)
    return _item(
        rng, "colour", "NAT", (1, 2), f"What colour is the {shape}?", list(FIXED_COLOURS),
        FIXED_COLOURS.index(colour),
        topic="physics", category="Colours", skill="Identify colours",
        lecture="Colour is a property of an object. Red, green and blue are colours.",
        solution=lambda o, s=shape: f"Look at the {s}. The {s} is {o}.",
        scene={"kind": "shapes", "objects": [{"shape": shape, "colour": colour, "cell": (1, 1), "grid": 3}]},
        caption=f"A {colour} {shape} in the middle of the picture.",
    )  # fmt: skip


def _shape_fixed(rng: random.Random) -> Item:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    return _item(
        rng, "shape", "NAT", (1, 3), "Which shape is shown in the picture?", list(SHAPES), SHAPES.index(shape),
        topic="physics", category="Shapes", skill="Identify shapes",
        lecture="A shape is the outline of an object. A circle is round; a square has four equal sides.",
        solution=lambda o: f"Look at the outline. The shape is a {o}.",
        scene={"kind": "shapes", "objects": [{"shape": shape, "colour": colour, "cell": _cells(rng, 1)[0], "grid": 3}]},
        caption=f"A {colour} {shape}.",
    )  # fmt: skip


def _bars_fixed(rng: random.Random) -> Item:
    colours = rng.sample(FIXED_BAR_COLOURS, len(FIXED_BAR_COLOURS))  # places on the chart
    heights = rng.sample(range(2, 10), len(colours))
    which = rng.choice(["tallest", "shortest"])
    target = colours[heights.index(max(heights) if which == "tallest" else min(heights))]
    thing = rng.choice(THINGS)
    hint = f"The bar chart shows how many {thing} each team collected. Each bar has its own colour."
    return _item(
        rng, "bars", "SOC", (3, 12), f"Which team's bar is the {which}?", list(FIXED_BAR_COLOURS),
        FIXED_BAR_COLOURS.index(target),
        topic="economics", category="Data and graphs", skill="Read a bar chart",
        lecture="A bar chart compares amounts. A taller bar means a larger amount.",
        solution=lambda o, w=which: f"Compare the heights of the bars. The {o} bar is the {w}.",
        hint=hint, scene={"kind": "bars", "colours": colours, "heights": heights},
        caption=f"A bar chart with four bars; the {target} bar is the {which}.",
    )  # fmt: skip


def _map_fixed(rng: random.Random) -> Item:
    colours = rng.sample(FIXED_BAR_COLOURS, len(FIXED_BAR_COLOURS))
    k = len(colours)
    rows, cols = rng.sample(range(4), k), rng.sample(range(4), k)
    direction = rng.choice(["north", "south", "east", "west"])
    key = {"north": rows, "south": [-r for r in rows], "west": cols, "east": [-c for c in cols]}[direction]
    target = colours[key.index(min(key))]
    options = [f"the {c} city" for c in FIXED_BAR_COLOURS]
    answer = FIXED_BAR_COLOURS.index(target)
    return _item(
        rng, "map", "SOC", (2, 8), f"Which city is farthest {direction}?", options, answer,
        topic="geography", category="Geography", skill="Read a map: cardinal directions",
        lecture="A compass rose shows the cardinal directions. The north arrow points north; on this map north is up.",
        solution=lambda o, d=direction: f"Use the compass rose. {o.capitalize()} is farthest {d}.",
        scene={"kind": "map", "colours": colours, "cells": list(zip(rows, cols))},
        caption=f"A grid map with a compass rose and four cities; {options[answer]} is farthest {direction}.",
    )  # fmt: skip


def _animals_fixed(rng: random.Random) -> Item:
    cls = rng.choice(list(ANIMALS))
    animal = rng.choice(ANIMALS[cls])
    group = FIXED_ANIMAL_GROUPS[list(ANIMALS).index(cls)]
    return _item(
        rng, "animals", "NAT", (2, 6), f"Which group does the {animal} belong to?", list(FIXED_ANIMAL_GROUPS),
        FIXED_ANIMAL_GROUPS.index(group),
        topic="biology", category="Classification", skill="Identify mammals, birds, fish and reptiles",
        lecture="Mammals have fur and feed milk to their young. Birds have feathers. Fish live in water and have gills."
        " Reptiles have scaly skin.",
        solution=lambda o, a=animal: f"The {a} belongs to the {o}.",
    )  # fmt: skip


def _conductor_fixed(rng: random.Random) -> Item:
    thing = rng.choice(CONDUCTORS + INSULATORS)
    options = ["a conductor", "an insulator"]
    return _item(
        rng, "conductor", "NAT", (6, 10), f"Is a {thing} an electrical conductor or an insulator?", options,
        int(thing in INSULATORS),
        topic="physics", category="Materials", skill="Identify electrical conductors and insulators",
        lecture="Metals such as copper, iron and silver are good conductors. Rubber, glass, wood, plastic and paper"
        " are insulators.",
        solution=lambda o, t=thing: f"The {t} is {'made of metal' if t in CONDUCTORS else 'not made of metal'}, so"
        f" it is {o}.",
    )  # fmt: skip


def _element_fixed(rng: random.Random) -> Item:
    substance = rng.choice(ELEMENTS + COMPOUNDS)
    options = ["an elementary substance", "a compound"]
    return _item(
        rng, "element", "NAT", (8, 12), f"Is {substance} an elementary substance or a compound?", options,
        int(substance in COMPOUNDS),
        topic="chemistry", category="Atoms and molecules", skill="Identify elementary substances and compounds",
        lecture="An elementary substance is made of one chemical element. A compound is made of two or more"
        " elements bonded together.",
        solution=lambda o, s=substance: f"{s.capitalize()} is {o}.",
    )  # fmt: skip


def _dictionary_fixed(rng: random.Random) -> Item:
    i = rng.randrange(0, len(WORDS) - 8)
    lo, hi = WORDS[i], WORDS[i + rng.randint(3, 7)]
    inside = rng.random() < 0.5
    word = rng.choice(WORDS[i + 1 : WORDS.index(hi)] if inside else WORDS[:i] + WORDS[WORDS.index(hi) + 1 :])
    return _item(
        rng, "dictionary", "LAN", (2, 8),
        f"Would you find the word {word} on a dictionary page with the following guide words?\n{lo} - {hi}",
        ["yes", "no"], int(not inside),
        topic="reference-skills", category="Reference skills", skill="Use guide words",
        lecture="Guide words are the first and last words on a dictionary page. Words on the page are in"
        " alphabetical order between them.",
        solution=lambda o, w=word, a=lo, b=hi: f"{w.capitalize()} is {'between' if a < w < b else 'not between'} {a}"
        f" and {b} in alphabetical order, so the answer is {o}.",
    )  # fmt: skip


def _word_class_fixed(rng: random.Random) -> Item:
    cls = rng.choice(list(WORD_CLASSES))
    word = rng.choice(WORD_CLASSES[cls])
    answer = list(WORD_CLASSES).index(cls)
    return _item(
        rng, "word_class", "LAN", (3, 9), f"Which part of speech is the word {word}?", list(FIXED_WORD_CLASSES),
        answer,
        topic="grammar", category="Parts of speech", skill="Identify nouns, verbs and adjectives",
        lecture="A noun names a person, place or thing. A verb tells an action. An adjective describes a noun.",
        solution=lambda o, w=word: f"{w.capitalize()} is {o}.",
    )  # fmt: skip


def _sum_hint_fixed(rng: random.Random) -> Item:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, 3), rng.randint(1, 3)
    options = [str(i) for i in range(2, 7)]
    return _item(
        rng, "sum_hint", "NAT", (1, 4), f"How many {thing} does {name} have in all?", options, a + b - 2,
        topic="units-and-measurement", category="Addition", skill="Add two numbers from a story",
        lecture="To find how many in all, add the numbers together.",
        solution=lambda o, x=a, y=b: f"Add {x} and {y}. {name} has {o} {thing} in all.",
        hint=f"{name} has {a} red {thing} and {b} blue {thing}.",
    )  # fmt: skip


def _reading_hint_fixed(rng: random.Random) -> Item:
    name = rng.choice(NAMES)
    place = rng.choice(FIXED_PLACES)
    return _item(
        rng, "reading_hint", "SOC", (3, 12), f"Where does {name} live?", list(FIXED_PLACES),
        FIXED_PLACES.index(place),
        topic="civics", category="Reading", skill="Find details in a text",
        lecture="Read the text carefully. The answer to a question is often stated in the text.",
        solution=lambda o, n=name: f"The text says that {n} lives in {o}.",
        hint=f"{name} lives in {place}. Every morning {name} walks to school with a friend.",
    )  # fmt: skip


IMAGE_TEMPLATES: dict[str, Callable[[random.Random], Item]] = {
    "count": _count, "colour": _colour, "shape": _shape, "position": _position, "bars": _bars, "map": _map,
}  # fmt: skip
TEXT_TEMPLATES: dict[str, Callable[[random.Random], Item]] = {
    "animals": _animals, "conductor": _conductor, "element": _element, "dictionary": _dictionary,
    "word_class": _word_class, "sum_hint": _sum_hint, "reading_hint": _reading_hint,
}  # fmt: skip
FIXED_TEMPLATES: dict[str, Callable[[random.Random], Item]] = {
    "count": _count_fixed, "colour": _colour_fixed, "shape": _shape_fixed, "position": _position,
    "bars": _bars_fixed, "map": _map_fixed, "animals": _animals_fixed, "conductor": _conductor_fixed,
    "element": _element_fixed, "dictionary": _dictionary_fixed, "word_class": _word_class_fixed,
    "sum_hint": _sum_hint_fixed, "reading_hint": _reading_hint_fixed,
}  # fmt: skip


def generate(n: int, seed: int, *, fixed_options: bool = False, families: Sequence[str] | None = None) -> list[Item]:
    """``n`` problems (about half with an image), deterministic in ``seed``; images are not rendered here.

    Args:
        n: Number of problems.
        seed: Seed of the world.
        fixed_options: Each family always shows the same option list in the same order (``FIXED_TEMPLATES``;
            text families ask about one item and offer its classes), so a letter is a fixed function of the
            content. Off: the default world, whose option lists are drawn per question.
        families: Only these question families (template names; default all). The image/text mix stays 55/45
            when both kinds are kept.
    """
    if n < 3:
        raise ValueError(f"n={n}: expected at least 3 problems (one per split)")
    known = set(IMAGE_TEMPLATES) | set(TEXT_TEMPLATES)
    unknown = sorted(set(families or ()) - known)
    if unknown or (families is not None and not families):
        raise ValueError(f"families={list(families or [])}: expected a non-empty subset of {sorted(known)}")
    rng = random.Random(seed)
    image_names = sorted(f for f in IMAGE_TEMPLATES if families is None or f in families)
    text_names = sorted(f for f in TEXT_TEMPLATES if families is None or f in families)
    image_share = 0.55 if image_names and text_names else 1.0 if image_names else 0.0
    image_templates = FIXED_TEMPLATES if fixed_options else IMAGE_TEMPLATES
    text_templates = FIXED_TEMPLATES if fixed_options else TEXT_TEMPLATES
    items = []
    for _ in range(n):
        if rng.random() < image_share:
            item = image_templates[rng.choice(image_names)](rng)
        else:
            item = text_templates[rng.choice(text_names)](rng)
        items.append(item)
    return items


def tokenizer_corpus(seed: int = 0) -> Iterator[str]:
    """The tiny tokenizer's corpus: the built-in one followed by the text of a small synthetic world (no images)."""
    yield from BUILTIN_CORPUS
    yield from world_texts(n=2000, seed=seed)


def world_texts(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Text of a synthetic world (prompts, answers, lectures, solutions, captions): a tokenizer corpus."""
    for item in generate(n, seed):
        p = item.problem
        yield render_sqa_prompt(p)
        yield p["lecture"]
        yield p["solution"]
        yield item.rejected
        if item.caption:
            yield item.caption


# -- rendering ----------------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill)


def render_scene(scene: dict[str, Any], size: int) -> Image.Image:
    """Draw a scene (``shapes``, ``bars`` or ``map``) as a ``size`` x ``size`` RGB image."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    s = size
    if scene["kind"] == "shapes":
        for obj in scene["objects"]:
            cell = s / obj["grid"]
            r, c = obj["cell"]
            pad = cell * 0.15
            box = (c * cell + pad, r * cell + pad, (c + 1) * cell - pad - 1, (r + 1) * cell - pad - 1)
            _draw_shape(draw, obj["shape"], box, COLOURS[obj["colour"]])
    elif scene["kind"] == "bars":
        k = len(scene["colours"])
        base, top = s * 0.92, s * 0.08
        draw.line([(s * 0.05, base), (s * 0.95, base)], fill=(0, 0, 0))
        width = s * 0.9 / k
        for i, (colour, h) in enumerate(zip(scene["colours"], scene["heights"])):
            x0 = s * 0.05 + i * width + width * 0.15
            y0 = base - (base - top) * h / 9
            draw.rectangle((x0, y0, x0 + width * 0.7, base - 1), fill=COLOURS[colour])
    elif scene["kind"] == "map":
        grid = 4
        cell = s * 0.8 / grid  # map on the left 80%, compass rose in the top-right corner
        for g in range(grid + 1):
            draw.line([(g * cell, 0), (g * cell, grid * cell)], fill=(170, 170, 170))
            draw.line([(0, g * cell), (grid * cell, g * cell)], fill=(170, 170, 170))
        for colour, (r, c) in zip(scene["colours"], scene["cells"]):
            pad = cell * 0.2
            draw.ellipse(
                (c * cell + pad, r * cell + pad, (c + 1) * cell - pad, (r + 1) * cell - pad), fill=COLOURS[colour]
            )
        cx, w = s * 0.9, s * 0.08
        draw.line([(cx, s * 0.05), (cx, s * 0.3)], fill=(0, 0, 0))
        draw.polygon([(cx - w / 2, s * 0.12), (cx + w / 2, s * 0.12), (cx, s * 0.02)], fill=(0, 0, 0))
    else:
        raise ValueError(f"scene kind {scene['kind']!r}: expected 'shapes', 'bars' or 'map'")
    return im


# -- writing ------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def synth_sqa(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    image_size: int = 32,
    *,
    tokenizer: bool = True,
    vocab_size: int = 2048,
    fixed_options: bool = False,
    families: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write a synthetic ScienceQA-style world in ScienceQA's layout, plus captions, preferences and a tokenizer.

    Files: ``problems.json``, ``pid_splits.json`` (train 60% / val 20% / test 20%),
    ``images/<split>/<pid>/image.png``, ``captions.json`` (one LLaVA pretraining record per image problem of the
    train split; image paths relative to ``images/``), ``preference.json`` (train split: chosen = solution and the
    right letter, rejected = the same reasoning for a wrong option) and ``tokenizer/``. Same arguments, same bytes.

    Args:
        out_dir: Folder to write (created; existing files of the same names are overwritten).
        n: Number of problems.
        seed: Seed of the world.
        image_size: Side of the square images in pixels.
        tokenizer: Also train and write the tokenizer folder.
        vocab_size: Vocabulary size of that tokenizer.
        fixed_options: Same option list, in the same order, for every question of a family (see ``generate``).
        families: Only these question families (template names; default all).

    Returns:
        A summary: paths and counts per split, with and without image.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: expected at least 16 pixels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = generate(n, seed, fixed_options=fixed_options, families=families)
    order = list(range(n))
    random.Random(seed + 1).shuffle(order)
    n_val = n_test = max(1, n // 5)
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[idx] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    problems, splits = {}, {"train": [], "val": [], "test": []}
    captions, preferences = [], []
    for idx, item in enumerate(items):
        pid, split = str(idx + 1), split_of[idx]
        problems[pid] = {**item.problem, "split": split}
        splits[split].append(pid)
        if item.scene is not None:
            folder = out / "images" / split / pid
            folder.mkdir(parents=True, exist_ok=True)
            render_scene(item.scene, image_size).save(folder / "image.png", format="PNG", optimize=False)
        if split != "train":
            continue
        rel_image = f"{split}/{pid}/image.png" if item.scene is not None else None
        if rel_image:
            captions.append({
                "id": pid,
                "image": rel_image,
                "conversations": [
                    {"from": "human", "value": "<image>\nGive a brief description of the image."},
                    {"from": "gpt", "value": item.caption},
                ],
            })  # fmt: skip
        p = item.problem
        letter = letters(len(p["choices"]))[p["answer"]]
        question = render_sqa_prompt(p).rsplit("\n", 1)[0] + "\nAnswer with the option's letter and explain why."
        preferences.append({
            "id": pid,
            "image": rel_image,
            "question": question,
            "chosen": f"{p['solution']} The answer is {letter}.",
            "rejected": item.rejected,
        })  # fmt: skip
    for v in splits.values():
        v.sort(key=int)
    _write_json(out / "problems.json", problems)
    _write_json(out / "pid_splits.json", splits)
    _write_json(out / "captions.json", captions)
    _write_json(out / "preference.json", preferences)
    if tokenizer:
        build_tokenizer(out / "tokenizer", tokenizer_corpus(seed), vocab_size=vocab_size)
    summary: dict[str, Any] = {"out": str(out), "problems": n, "captions": len(captions)}
    summary["preferences"] = len(preferences)
    for split, pids in splits.items():
        with_image = sum(1 for pid in pids if problems[pid]["image"])
        summary[split] = {"problems": len(pids), "with_image": with_image}
    return summary
