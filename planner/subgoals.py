"""A multi-step instruction as ordered clauses, each an instruction of its own.

    split_instruction("push the red cube to the left side, then the blue sphere to the right side")
    -> ["push the red cube to the left side", "push the blue sphere to the right side"]

The VLA alone does not chain subgoals: given a two-step instruction it solves 1 of 20 two-step
episodes, and given each clause in turn, switched when the first holds, 18 of 20 (README). The
controller therefore plans clause by clause: the done model (models/done.py) says, on the present
latent, which clauses already hold, and the VLA proposes, and the goal model aims, for the first
that does not. Which clauses there are is read here from the text by a few rules on English connectives
("then", "and after that", "; next,", "once ..., ..."), not by a parser; an instruction without
one is a single clause and plans as before.
"""

from __future__ import annotations

import re

# Where one clause ends and the next begins.
_CONNECTIVE = re.compile(r"\s*(?:,\s*and then|,\s*then|;\s*next,?|\band after that|\bafter that,|\bthen)\s+", re.I)
_LEADING = re.compile(r"^(?:first|firstly|to start,?|start by)\s+", re.I)
# "begin with the red cube: push it to the left side" -> "push the red cube to the left side"
_TOPIC = re.compile(r"^(?:begin|start) with (?P<thing>.+?):\s*(?P<rest>.+)$", re.I)
# "once the red cube is in the left side, bring ..." -> "move the red cube to the left side", "bring ..."
_ONCE = re.compile(r"^once (?P<thing>.+?) (?:is|sits|rests) (?:in|on|at) (?P<place>.+?),\s*(?P<rest>.+)$", re.I)


def split_instruction(text: str) -> list[str]:
    """The instruction's clauses, in the order they must be done (one clause if it names one step)."""
    text = " ".join(text.split())
    once = _ONCE.match(text)
    if once:
        return [f"move {once['thing']} to {once['place']}", *split_instruction(once["rest"])]
    clauses = []
    for part in _CONNECTIVE.split(text):
        part = _LEADING.sub("", part.strip(" ,;."))
        if not part:
            continue
        topic = _TOPIC.match(part)
        if topic:
            part = re.sub(r"\bit\b", topic["thing"], topic["rest"], count=1)
        if clauses and part.lower().startswith("the "):  # "..., then the blue sphere to ...": the verb carries over
            part = f"{_verb(clauses[-1])} {part}"
        clauses.append(part)
    return clauses or [text]


def _verb(clause: str) -> str:
    """The words of a clause before its first "the" (its verb): "push" of "push the red cube ..."."""
    head = re.split(r"\bthe\b", clause, maxsplit=1, flags=re.I)[0].strip()
    return head or "move"
