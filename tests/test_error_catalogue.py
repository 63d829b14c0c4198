"""docs/errors.md quotes the project's messages by hand: each message quoted in its tables must
still be one the code can print, so that the catalogue cannot drift from the code.

The code side is every string literal of nsr/, models/ and the scripts, read with `ast`: an
f-string's `{…}` fields, `%s` and `str.format`'s `{}` are holes that stand for a value (the
texts of `"a" if c else "b"` and the fixed parts of a pathlib path are read as such). The doc
side is each backquoted span of two words or more in a table row's first column; spans of one
word (`--gamma`, `loguniform`) name a flag or a value. `…`, `...` and `<what>` in a span stand
for left-out text and ` / ` separates two alternatives: they cut the span into pieces, and each
piece must be found in the code. A hole may stand for a value the doc writes out (`'out'`,
`OUT/last.pt`, `lr: 0.01 -> 0.1`), never for a sentence. A piece may run over several literals
(a message put together from parts) where one literal ends and the next begins, each part mostly
fixed text.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

from tests.helpers import ROOT

HOLE = None          # an item of a template that stands for a formatted value
HOLE_MAX = 60        # the longest value text a hole may stand for (`No space left on device`)...
HOLE_SPACES = 5      # ...and the most spaces in it (`pid P on HOST, started T`): a value, not a sentence.
                     # A hole at the start of a part holds one word, at the end of a piece two at most.
FIXED_SHARE = 0.3    # each part of a piece is at least this share of fixed text
MIN_FIXED = 6        # each part of a piece matches at least this many characters of fixed text
JOINTS = " ;:,)"     # what may stand between two literals of one message, or close it
WILDCARD = re.compile(r"…|\.\.\.|<[^<>]*>| / ")  # left-out text, or " / " between two alternatives
FORMAT_FIELD = re.compile(r"%[-#0-9.]*[sdrfgi]|\{[^{}]*\}")


def source_templates() -> list[list]:
    """Every string literal of the code as a list of characters and holes."""
    files = [*glob.glob(os.path.join(ROOT, "nsr", "**", "*.py"), recursive=True),
             *glob.glob(os.path.join(ROOT, "models", "**", "*.py"), recursive=True),
             *glob.glob(os.path.join(ROOT, "*.py"))]
    templates = []

    def plain(text):  # (markdown cannot show a backquote inside a quoted message: the code's are left out)
        items = []
        for i, part in enumerate(FORMAT_FIELD.split(text.replace("`", ""))):
            items += ([HOLE] if i else []) + list(part)
        return items

    def product(alternatives_of_parts):
        out = [[]]
        for alternatives in alternatives_of_parts:
            out = [done + more for done in out for more in alternatives]
        return out

    def field(node):
        """The alternatives a formatted value can read as: a hole, the two texts of `"a" if c else
        "b"`, the fixed parts of a pathlib path `folder / "log" / "dispatcher.log"`."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [list(node.value)]
        if isinstance(node, ast.IfExp):
            return field(node.body) + field(node.orelse)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return product([field(node.left), [["/"]], field(node.right)])
        return [[HOLE]]

    def template(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [plain(node.value)]
        if isinstance(node, ast.JoinedStr):
            return product([[plain(v.value)] if isinstance(v, ast.Constant) else field(v.value) for v in node.values])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = template(node.left), template(node.right)
            if left or right:  # "text" + name: the name is a hole
                return product([left or [[HOLE]], right or [[HOLE]]])
        return []

    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            templates += [items for items in template(node) if sum(item is not HOLE for item in items) >= MIN_FIXED]
    return templates


def quoted_messages() -> list[tuple[int, str]]:
    """(line, span) for each backquoted span of two words or more in a table's first column."""
    found = []
    with open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.startswith("|") or re.match(r"\|\s*-{3}", line):
                continue
            cells = line.strip().strip("|").split(" | ")
            if len(cells) < 2 or cells[0].strip() in ("message", "message (abridged)"):
                continue
            found += [(number, span) for span in re.findall(r"`([^`]+)`", cells[0]) if len(span.split()) >= 2]
    return found


def infix_ends(piece: str, start: int, items: list, anchored: bool) -> dict[int, bool]:
    """{end: at_joint} for each end for which piece[start:end] matches a run of `items` with at
    least MIN_FIXED characters of fixed text. `anchored`: the run starts where a literal starts (the
    template's start, or right after a hole). at_joint: the run can end where a literal ends (the
    template's end, or right before a hole), so that another literal may go on from there."""
    # state: (position in items, characters the hole at that position has taken) -> fixed chars matched
    def close(states):  # a hole may end (or stand for nothing) here
        frontier = list(states.items())
        while frontier:
            (j, taken), fixed = frontier.pop()
            if j < len(items) and items[j] is HOLE and states.get((j + 1, 0), -1) < fixed:
                states[(j + 1, 0)] = fixed
                frontier.append(((j + 1, 0), fixed))
        return states

    states = close({(j, 0): 0 for j in range(len(items)) if not anchored or j == 0 or items[j - 1] is HOLE})
    ends = {}
    for i in range(start, len(piece)):
        nxt = {}
        for (j, taken), fixed in states.items():
            if j >= len(items):
                continue
            if items[j] is HOLE:
                value = piece[i - taken:i + 1]
                spaces = HOLE_SPACES if i - taken > start else 0
                state, gain = ((j, taken + 1), 0) if taken < HOLE_MAX and value.count(" ") <= spaces else (None, 0)
            else:
                state, gain = ((j + 1, 0), 1) if items[j] == piece[i] else (None, 0)
            if state and nxt.get(state, -1) < fixed + gain:
                nxt[state] = fixed + gain
        if i + 1 == len(piece):  # the piece ends in a hole: two words at most
            nxt = {(j, taken): fixed for (j, taken), fixed in nxt.items() if piece[i + 1 - taken:].count(" ") <= 1}
        states = close(nxt)
        if not states:
            break
        good = [(j, taken) for (j, taken), fixed in states.items()
                if fixed >= MIN_FIXED and fixed >= FIXED_SHARE * (i + 1 - start)]
        if good:
            ends[i + 1] = ends.get(i + 1, False) or any(
                j == len(items) and items[-1] is not HOLE or j < len(items) and items[j] is HOLE and not taken
                for j, taken in good)
    return ends


def piece_in_code(piece: str, templates: list[list]) -> bool:
    """Whether the piece is a run of one literal, or of several literals one after another (each
    part starting and ending where a literal does, with only JOINTS between them)."""
    words = set(re.findall(r"[A-Za-z_]{4,}", piece))
    candidates = [t for t in templates if words & set(re.findall(r"[A-Za-z_]{4,}", "".join(x for x in t if x)))]
    todo, seen = [0], {0}
    while todo:
        start = todo.pop()
        for items in candidates:
            for end, at_joint in infix_ends(piece, start, items, anchored=start > 0).items():
                rest = end
                while rest < len(piece) and piece[rest] in JOINTS:
                    rest += 1
                if rest == len(piece):
                    return True
                for nxt in {end, rest} - seen if at_joint else ():
                    seen.add(nxt)
                    todo.append(nxt)
    return False


def pieces(span: str) -> list[str]:
    """The parts of a quoted message between its `…`s, those of two words or more (a part of one
    word, `--momentum/--nesterov`, names something), without the brackets and stops around them."""
    parts = [p.strip(" :;,.") for p in WILDCARD.split(span)]
    parts = [p[1:-1] if p.startswith("(") and p.endswith(")") else p for p in parts]
    return [p for p in parts if " " in p and len(re.findall(r"[A-Za-z]{2,}", p)) >= 2]


MESSAGES = quoted_messages()
TEMPLATES = source_templates()


def test_the_catalogue_quotes_messages():
    assert len(MESSAGES) > 100 and len(TEMPLATES) > 1000


@pytest.mark.parametrize("line,span", MESSAGES, ids=[f"line{n}" for n, _ in MESSAGES])
def test_each_quoted_message_is_in_the_code(line, span):
    missing = [p for p in pieces(span) if not piece_in_code(p, TEMPLATES)]
    assert pieces(span) and not missing, f"docs/errors.md:{line}: no message of the code reads {missing}"


@pytest.mark.parametrize("text,found", [
    ("lambda for NSR layer 'out' must be a finite number >= 0", True),  # {what}, {name!r} are holes
    ("lambda for NSR layer 'out' must be a whole number >= 0", False),  # a changed word
    ("cannot resume OUT/last.pt: settings differ from the saved run (lr: 0.01 -> 0.1)", True),
    ("the training set of X is empty", True),
    ("the training set of X is gone", False),
    ("nesterov requires momentum > 0", False),
    ("port N is taken (another NNI experiment?)", False),
    ("the validation set of X is empty", False),
])
def test_the_search_tells_a_message_from_a_changed_one(text, found):
    assert all(piece_in_code(p, TEMPLATES) for p in pieces(text)) is found
