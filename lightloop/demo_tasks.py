"""The demo's tasks and their rewards: pure functions, no I/O.

Three task sets. `opposite-choice` (the default): "What is the opposite of 'hot'? Choose from:
cold, hot, loud.", answered with one word. `opposites`: the same words with no options, so the
opposite must be recalled. Both agents show the form once, as a worked example turn (the
opposite of 'up' is "down"), as agents commonly do: without it SmolLM2-135M never answers
exactly (0 of 768 tries, README), and RL cannot reinforce what is never tried. With it the base
model answers in one word but often with the wrong one (it echoes the question's word, or a
distractor): 14 of 32 held-out tasks are right with options, 13 without. What a few minutes of
RL teach it is to give the opposite. With options, that skill is all it takes, and held-out
reward rises past 0.9; without them it plateaus near 0.72, held back by what 135M parameters
recall (README). `sums` ("What is 7 + 5?", the number only) is the earlier demo: SmolLM2-135M
rarely adds correctly (4-20% of its tries contain the right sum, none is the number alone;
bench/demo_baseline.py), so there is little to reinforce and its curve stalls near 0.45.

Each reward is 1 for the exact answer (case, quotes, emphasis and final punctuation aside); the
right answer among other words earns 0.5 plus less than 0.1 for brevity (the task asks for the
answer alone), unless a wrong word offered or asked about is there too ("hot or cold" is a
hedge: 0). For sums, where the form was the hard part, a wrong number still earns 0.2 plus
brevity and anything else the brevity term alone, so that a group's tries seldom tie. For
opposites a wrong word earns 0, whatever its form: rewarding short wrong words would reinforce
the base model's commonest mistake, echoing the word asked about."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

__all__ = ["KINDS", "DemoTask", "Opposite", "OppositeChoice", "Sum", "from_row", "reward", "split"]


class DemoTask(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def system(self) -> str:
        """The agent's system prompt."""
        ...

    @property
    def question(self) -> str: ...

    @property
    def answers(self) -> tuple[str, ...]: ...

    @property
    def credits_form(self) -> bool:
        """A wrong answer in the asked-for form still earns partial credit."""
        ...

    @property
    def decoys(self) -> tuple[str, ...]:
        """Wrong words that, beside the right one, make a reply a hedge ("hot or cold"): 0."""
        ...

    def right_form(self, text: str) -> bool:
        """The reply has the asked-for form (a number, one word), right or wrong."""
        ...

    @property
    def max_tokens(self) -> int:
        """The answer's token budget."""
        ...

    @property
    def train_temperature(self) -> float:
        """The training tries' sampling temperature (held-out tasks are answered greedily)."""
        ...

    def messages(self) -> list[dict[str, str]]:
        """The agent's chat messages for this task."""
        ...

    def row(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Sum:
    a: int
    b: int
    kind: ClassVar[str] = "sums"
    system: ClassVar[str] = "You are a calculator. Reply with the number only."
    credits_form: ClassVar[bool] = True
    decoys: ClassVar[tuple[str, ...]] = ()
    # As measured for the sums curve in the README: 8 tokens cut "17 + 13 = 30" short.
    max_tokens: ClassVar[int] = 16
    train_temperature: ClassVar[float] = 1.0

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def answers(self) -> tuple[str, ...]:
        return (str(self.a + self.b),)

    @property
    def answer(self) -> str:
        return self.answers[0]

    def right_form(self, text: str) -> bool:
        return any(ch.isdigit() for ch in text)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.question}]

    def row(self) -> dict[str, Any]:
        """The task as a dataset row (its id keeps loading idempotent)."""
        return {
            "id": f"{self.a}+{self.b}",
            "kind": self.kind,
            "a": self.a,
            "b": self.b,
            "question": self.question,
        }


@dataclass(frozen=True)
class Opposite:
    word: str
    opposites: tuple[str, ...]  # every answer accepted as exact
    kind: ClassVar[str] = "opposites"
    system: ClassVar[str] = "Reply with the answer only, one word."
    credits_form: ClassVar[bool] = False
    # A one-word answer takes 2-3 tokens; a sentence is cut off before its answer.
    max_tokens: ClassVar[int] = 8
    # Training tries: at 0.7, 40% exact and 50% of groups not flat (0.5: 46%, 33%; 1.0: 24%,
    # 54%; docs/demo-baseline-opposites-smollm2.json). One 15-minute run each: 0.7 ended at 0.75
    # held-out, 1.0 at 0.66 (its steps trained on more samples, so it took fewer; README).
    train_temperature: ClassVar[float] = 0.7
    # The worked example the agent shows before the question; neither word is in any task.
    example: ClassVar[tuple[str, str]] = ("up", "down")

    @property
    def question(self) -> str:
        return _opposite_question(self.word)

    @property
    def decoys(self) -> tuple[str, ...]:
        return (self.word,)

    @property
    def answers(self) -> tuple[str, ...]:
        return self.opposites

    def right_form(self, text: str) -> bool:
        return len(_words(text)) == 1

    def messages(self) -> list[dict[str, str]]:
        word, answer = self.example
        return _worked_example(self.system, _opposite_question(word), answer, self.question)

    def row(self) -> dict[str, Any]:
        return {
            "id": f"opposite:{self.word}",
            "kind": self.kind,
            "word": self.word,
            "answers": list(self.opposites),
            "question": self.question,
        }


@dataclass(frozen=True)
class OppositeChoice:
    """The opposite of a word, chosen from three: its opposite, the word itself (what the base model
    most often echoes) and one unrelated word, in an order fixed per task (so a group's tries share
    their prompt). What RL teaches here is the skill, to pick the opposite; the open form also
    needs the word recalled, which SmolLM2-135M's 135M parameters hold for about half of the tasks
    (pass@16 at temperature 1.0 on the held-out tasks: 0.53, README)."""

    word: str
    opposites: tuple[str, ...]
    options: tuple[str, ...]  # what the agent offers; exactly one is in `opposites`
    kind: ClassVar[str] = "opposite-choice"
    system: ClassVar[str] = "Reply with the answer only, one word."
    credits_form: ClassVar[bool] = False
    max_tokens: ClassVar[int] = 8
    train_temperature: ClassVar[float] = 0.7
    example: ClassVar[tuple[str, str, tuple[str, ...]]] = ("up", "down", ("up", "red", "down"))

    @property
    def question(self) -> str:
        return _choice_question(self.word, self.options)

    @property
    def decoys(self) -> tuple[str, ...]:
        return tuple(o for o in self.options if o not in self.opposites)

    @property
    def answers(self) -> tuple[str, ...]:
        return self.opposites

    def right_form(self, text: str) -> bool:
        return len(_words(text)) == 1

    def messages(self) -> list[dict[str, str]]:
        word, answer, options = self.example
        return _worked_example(self.system, _choice_question(word, options), answer, self.question)

    def row(self) -> dict[str, Any]:
        return {
            "id": f"opposite-choice:{self.word}",
            "kind": self.kind,
            "word": self.word,
            "answers": list(self.opposites),
            "options": list(self.options),
            "question": self.question,
        }


def _worked_example(system: str, example: str, answer: str, question: str) -> list[dict[str, str]]:
    """The agent's chat: its system prompt, one worked example turn, then the task's question."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": example},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": question},
    ]


def _choice_question(word: str, options: Sequence[str]) -> str:
    return f"What is the opposite of '{word}'? Choose from: {', '.join(options)}."


def _opposite_question(word: str) -> str:
    return f"What is the opposite of '{word}'?"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _bare(reply: str) -> str:
    """The reply without what does not change the answer: case, whitespace, quotes, markdown
    emphasis and final punctuation ("**Cold.**" and "cold?" are "cold")."""
    return reply.strip().strip("\"'*`_ ").rstrip(".!?").strip("\"'*`_ ").lower()


def reward(task: DemoTask, reply: str) -> float:
    text = _bare(reply)
    if text in task.answers:
        return 1.0
    brevity = 0.1 * 20 / (20 + len(reply.strip()))  # 0.1 for nothing, 0.05 at 20 characters, never 0
    # A restated question ("the opposite of 'big' is small") is no hedge; "big or small" is. The
    # answer must be outside it too: "the opposite of cold" does not answer 'hot'.
    rest = _words(re.sub(r"opposite of\W+\w+", " ", text))
    if any(answer in rest for answer in task.answers) and not any(d in rest for d in task.decoys):
        return 0.5 + brevity
    if not task.credits_form:
        return 0.0
    if task.right_form(text):
        return 0.2 + brevity
    return brevity


# Common opposites, one direction each (so that no held-out task is a training task reversed),
# with every answer a dictionary gives as its opposite. Not chosen by what the model answers.
OPPOSITES = """
hot: cold | big: small little | fast: slow | happy: sad unhappy | dark: light bright
old: young new | open: closed shut | rich: poor | wet: dry | full: empty | early: late
strong: weak | win: lose | day: night | black: white | left: right | in: out | love: hate
true: false | yes: no | high: low | thick: thin | good: bad evil | clean: dirty | heavy: light
tall: short | long: short | hard: soft | loud: quiet soft silent | push: pull
start: end finish stop | first: last | top: bottom | inside: outside | above: below
front: back rear behind | north: south | east: west | on: off | always: never
all: none nothing | before: after | come: go | buy: sell | give: take receive | laugh: cry
sweet: sour bitter | wide: narrow | deep: shallow | near: far | cheap: expensive
safe: dangerous unsafe | healthy: sick ill unhealthy | alive: dead | friend: enemy foe
war: peace | question: answer | boy: girl | man: woman | king: queen | brother: sister
father: mother | husband: wife | son: daughter | summer: winter | sunrise: sunset
morning: evening night | accept: reject refuse decline | arrive: leave depart
asleep: awake | beautiful: ugly | brave: cowardly afraid scared | cool: warm hot
correct: wrong incorrect | easy: difficult hard | enter: exit leave | entrance: exit
fat: thin skinny slim | floor: ceiling | forget: remember | found: lost | guilty: innocent
hello: goodbye bye | import: export | include: exclude | increase: decrease | inhale: exhale
kind: cruel unkind mean | major: minor | maximum: minimum | more: less fewer | most: least
odd: even | optimist: pessimist | plus: minus | positive: negative | private: public
rough: smooth | same: different | sharp: dull blunt | smile: frown | stand: sit
success: failure | tight: loose | together: apart alone separate | under: over above
visible: invisible | wild: tame domestic | fail: pass succeed
float: sink | freeze: melt thaw boil | generous: stingy selfish greedy | hungry: full
joy: sorrow sadness grief | junior: senior | multiply: divide | native: foreign
obey: disobey | past: future present | polite: rude impolite | absent: present
problem: solution | rise: fall set sink | shout: whisper | stop: go | student: teacher
tiny: huge enormous giant big large | vertical: horizontal | victory: defeat loss
wake: sleep | wise: foolish stupid unwise | sunny: cloudy rainy | spend: save earn
borrow: lend | dawn: dusk | heaven: hell | parent: child | teach: learn | attack: defend
"""


def _opposites() -> list[Opposite]:
    out = []
    for entry in OPPOSITES.replace("\n", " | ").split("|"):
        if entry.strip():
            word, answers = entry.split(":")
            out.append(Opposite(word.strip(), tuple(answers.split())))
    return out


def _choices() -> list[OppositeChoice]:
    """Each opposites task with its three options. The unrelated word is drawn from the other
    tasks' words, never one that shares an entry with the word or any of its answers (for 'hot',
    not 'warm' of "cool: warm hot"), so that no offered wrong word is a fair answer."""
    tasks = _opposites()
    entries = [{t.word, *t.answers} for t in tasks]
    every = sorted(set().union(*entries))
    out = []
    for t in tasks:
        related = set().union(*(e for e in entries if e & {t.word, *t.answers}))
        rng = random.Random(f"choice:{t.word}")
        options = [t.answers[0], t.word, rng.choice([w for w in every if w not in related])]
        rng.shuffle(options)
        out.append(OppositeChoice(t.word, t.answers, tuple(options)))
    return out


def _sums() -> list[Sum]:
    return [Sum(a, b) for a in range(20) for b in range(20)]


KINDS: dict[str, Callable[[], Sequence[DemoTask]]] = {
    "opposite-choice": _choices,
    "opposites": _opposites,
    "sums": _sums,
}


def split(kind: str = "opposites", held_out: int = 32) -> tuple[list[DemoTask], list[DemoTask]]:
    """(training tasks, held-out tasks), split once: the same split on every run and seed."""
    every: list[DemoTask] = list(KINDS[kind]())
    random.Random(0).shuffle(every)
    return every[held_out:], every[:held_out]


def from_row(row: dict[str, Any]) -> DemoTask:
    """The task a dataset row was made from (the agent gets the row)."""
    kind = row.get("kind", "sums")
    if kind == "sums":
        return Sum(int(row["a"]), int(row["b"]))
    if kind == "opposites":
        return Opposite(str(row["word"]), tuple(str(a) for a in row["answers"]))
    if kind == "opposite-choice":
        answers = tuple(str(a) for a in row["answers"])
        return OppositeChoice(str(row["word"]), answers, tuple(str(o) for o in row["options"]))
    raise ValueError(f"not a demo task: kind {kind!r} (expected one of {sorted(KINDS)})")
