"""Subscription filters: parsed and validated once, compiled to predicates, and described to the
index so matching stays cheap however many subscriptions there are.

Two spellings, one meaning:

* `filters` (object): attribute → condition, all must hold. An attribute is a CloudEvents attribute
  or extension (`subject`, `type`, `container`) or a field of the event's data (`data.size`,
  `data.object.name`). A condition is a value (exact match) or an object of operators, all of
  which must hold (`{"gte": 1, "lt": 9}`):
  `{"prefix": "photos/"}`, `{"suffix": ".jpg"}`, `{"glob": "photos/*.jpg"}` (`*` stays within a
  path segment, `**` crosses `/`), `{"gt": 10}`,
  `{"gte": 10}`, `{"lt": 10}`, `{"lte": 10}`, `{"exists": true}`, `{"in": ["a", "b"]}`,
  `{"ne": "x"}`, `{"eq": "x"}`.
* `filter`: a composition `{"all": [...]}`, `{"any": [...]}`, `{"not": ...}` whose leaves are
  `filters` objects, or an expression string in a CESQL-like syntax:
  `subject LIKE 'photos/%.jpg' AND (data.size > 1000 OR EXISTS thumbnail) AND NOT type = 'x'`
  (operators `= != <> < <= > >= LIKE NOT LIKE IN (…) EXISTS`, `AND OR NOT`, parentheses;
  LIKE takes `%` for any run of characters and `_` for one).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

from router.events import Event

Predicate = Callable[[Event], bool]
_MISSING = object()
_NAME = re.compile(r"^(data(\.[A-Za-z0-9_\-]+)+|[a-z0-9]{1,20})$")
_OPERATORS = ("eq", "ne", "prefix", "suffix", "glob", "gt", "gte", "lt", "lte", "exists", "in")


class FilterError(ValueError):
    """A filter that cannot be used; the message names the fault (the API answers 400)."""


# ------------------------------------------------------------------------------------------------
# Conditions


@dataclasses.dataclass(frozen=True)
class Condition:
    """One test of one attribute."""

    attribute: str
    op: str
    value: Any

    def index_key(self) -> tuple[str, str, Any] | None:
        """How the index can find subscriptions with this condition without testing them all:
        (kind, attribute, key) for exact values, literal prefixes and literal suffixes."""
        if self.attribute.startswith("data."):
            return None  # data is not looked at before a subscription is a candidate
        if self.op == "eq" and isinstance(self.value, (str, int, float, bool)):
            return ("eq", self.attribute, self.value)
        if self.op == "prefix" and self.value:
            return ("prefix", self.attribute, self.value)
        if self.op == "suffix" and self.value:
            return ("suffix", self.attribute, self.value)
        if self.op == "glob":
            literal_prefix = re.split(r"[*?\[]", self.value, maxsplit=1)[0]
            if literal_prefix:
                return ("prefix", self.attribute, literal_prefix)
            literal_suffix = re.split(r"[*?\]]", self.value)[-1]
            if literal_suffix:
                return ("suffix", self.attribute, literal_suffix)
        return None


@functools.lru_cache(maxsize=1024)
def attribute_getter(name: str) -> Callable[[Event], Any]:
    # Shared: a getter is a pure function of the name, and one copy per name keeps 100,000
    # subscriptions on a few attributes from holding 100,000 closures.
    if name.startswith("data."):
        path = name.split(".")[1:]

        def get(event: Event) -> Any:
            value: Any = event.data
            for part in path:
                if isinstance(value, dict) and part in value:
                    value = value[part]
                elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                    value = value[int(part)]
                else:
                    return _MISSING
            return value

        return get

    def get_attribute(event: Event) -> Any:
        value = event.attribute(name)
        return _MISSING if value is None else value

    return get_attribute


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _compile_condition(cond: Condition) -> Predicate:
    if isinstance(cond.value, list):
        return _build_condition(cond.attribute, cond.op, cond.value)
    return _shared_condition(cond.attribute, cond.op, cond.value)


# typed: 1, 1.0 and True are equal as keys but not as filter values.
@functools.lru_cache(maxsize=4096, typed=True)
def _shared_condition(attribute: str, op: str, value: Any) -> Predicate:
    """One predicate for every subscription with the same condition (say `data.size > 10`): less
    memory, and the matching path keeps touching the same few objects."""
    return _build_condition(attribute, op, value)


def _build_condition(attribute: str, op: str, expected: Any) -> Predicate:
    get = attribute_getter(attribute)
    if op == "exists":
        return (lambda e: get(e) is not _MISSING) if expected else (lambda e: get(e) is _MISSING)
    if op == "eq":
        return lambda e: _equal(get(e), expected)
    if op == "ne":
        return lambda e: (v := get(e)) is not _MISSING and not _equal(v, expected)
    if op == "in":
        return lambda e: (v := get(e)) is not _MISSING and any(_equal(v, x) for x in expected)
    if op == "prefix":
        return lambda e: isinstance(v := get(e), str) and v.startswith(expected)
    if op == "suffix":
        return lambda e: isinstance(v := get(e), str) and v.endswith(expected)
    if op == "glob":
        pattern = glob_regex(expected)
        return lambda e: isinstance(v := get(e), str) and pattern.match(v) is not None
    if op == "glob-after":  # only after the index proved the literal the pattern starts with
        start, rest = expected
        pattern = glob_regex(rest)
        return lambda e: isinstance(v := get(e), str) and pattern.match(v, start) is not None
    if op == "glob-before":  # only after the index proved the literal the pattern ends with
        length, rest = expected
        pattern = glob_regex(rest)
        return lambda e: isinstance(v := get(e), str) and pattern.match(v, 0, len(v) - length) is not None
    if op == "like":
        like = _like_matcher(expected)
        return lambda e: isinstance(v := get(e), str) and like(v)
    compare = {"gt": float.__gt__, "gte": float.__ge__, "lt": float.__lt__, "lte": float.__le__}[op]
    bound = float(expected)
    return lambda e: (n := _number(get(e))) is not None and compare(n, bound)


@functools.lru_cache(maxsize=4096)
def glob_regex(pattern: str) -> re.Pattern:
    """A path glob as object stores and .gitignore read it: `*` is any run of characters within one
    path segment (it never crosses `/`), `**` any run across segments (`a/**/b` also matches
    `a/b`), `?` one character other than `/`, `[abc]` / `[!abc]` one character of (not of) a set."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[" and (end := pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)) != -1:
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            escaped = "".join("\\" + c if c in "\\^]" else c for c in body)
            out.append(f"[^/{escaped}]" if negate else f"(?!/)[{escaped}]")
            i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _equal(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return False
    if actual == expected and type(actual) is type(expected):
        return True
    # Attributes travel as strings (CloudEvents binary mode, query strings): compare numbers by value.
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        number = _number(actual)
        return number is not None and number == float(expected)
    return actual == expected


def _like_matcher(pattern: str) -> Callable[[str], bool]:
    """LIKE without backtracking: the pattern's `%`-separated segments are matched left to right,
    each at its leftmost place (which never loses a match), so a subject costs O(len × pattern) at
    worst. A regex of `.*` runs backtracked exponentially: `'%a%a%a%a%a%a%c%b'` against a 61-character
    subject blocked the event loop for 5 s."""
    first, *middle = pattern.split("%")
    if not middle:
        return lambda s: len(s) == len(first) and _segment_at(s, first, 0)
    last = middle.pop()
    middle = [seg for seg in middle if seg]

    def match(s: str) -> bool:
        end = len(s) - len(last)
        if end < len(first) or not _segment_at(s, first, 0) or not _segment_at(s, last, end):
            return False
        pos = len(first)
        for seg in middle:
            pos = _find_segment(s, seg, pos, end)
            if pos < 0:
                return False
            pos += len(seg)
        return True
    return match


def _segment_at(s: str, seg: str, i: int) -> bool:
    """Whether seg (`_` matching any one character) matches s at i."""
    if "_" not in seg:
        return s.startswith(seg, i)
    return i + len(seg) <= len(s) and all(c == "_" or s[i + k] == c for k, c in enumerate(seg))


def _find_segment(s: str, seg: str, start: int, end: int) -> int:
    """The leftmost i in [start, end - len(seg)] where seg matches, or -1."""
    if "_" not in seg:
        return s.find(seg, start, end)
    for i in range(start, end - len(seg) + 1):
        if _segment_at(s, seg, i):
            return i
    return -1


# ------------------------------------------------------------------------------------------------
# Parsing the `filters` object and the `filter` composition


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise FilterError(f"{where}: {name!r} is not an attribute name (lower-case letters and digits, "
                          "at most 20, or data.<field>[.<field>…])")
    return name


def parse_conditions(filters: Any, where: str = "filters") -> list[Condition]:
    if filters is None:
        return []
    if not isinstance(filters, dict):
        raise FilterError(f"{where} must be an object mapping attribute names to conditions")
    conditions = []
    for name, spec in filters.items():
        _check_name(name, where)
        if isinstance(spec, dict) and len(spec) > 1:
            # Several operators on one attribute all hold: {"gte": 1, "lt": 9} is 1 <= x < 9.
            conditions.extend(_parse_condition(name, {op: value}, f"{where}.{name}.{op}") for op, value in spec.items())
        else:
            conditions.append(_parse_condition(name, spec, f"{where}.{name}"))
    return conditions


def _parse_condition(name: str, spec: Any, where: str) -> Condition:
    if isinstance(spec, (str, int, float, bool)):
        return Condition(name, "eq", spec)
    if not isinstance(spec, dict) or not spec:
        raise FilterError(f"{where}: a condition is a value or an object of operators ({', '.join(_OPERATORS)})")
    ((op, value),) = spec.items()
    if op not in _OPERATORS:
        raise FilterError(f"{where}: unknown operator {op!r}; known: {', '.join(_OPERATORS)}")
    if op in ("eq", "ne") and not isinstance(value, (str, int, float, bool)):
        raise FilterError(f"{where}: {op} compares with a string, number or boolean")
    if op in ("prefix", "suffix", "glob") and (not isinstance(value, str) or not value):
        raise FilterError(f"{where}: {op} takes a non-empty string")
    if op in ("gt", "gte", "lt", "lte") and _number(value) is None:
        raise FilterError(f"{where}: {op} takes a number, got {value!r}")
    if op == "exists" and not isinstance(value, bool):
        raise FilterError(f"{where}: exists takes true or false")
    if op == "in" and (not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float, bool)) for v in value)):
        raise FilterError(f"{where}: in takes a non-empty list of strings, numbers or booleans")
    if op in ("gt", "gte", "lt", "lte"):
        value = _number(value)
    return Condition(name, op, value)


# An expression tree: ("all", [..]) | ("any", [..]) | ("not", node) | Condition
Node = Any


def parse_expression(spec: Any, where: str = "filter") -> Node:
    if isinstance(spec, str):
        return _ExpressionParser(spec, where).parse()
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("all", "any", "not"):
        ((op, value),) = spec.items()
        if op == "not":
            return ("not", parse_expression(value, f"{where}.not"))
        if not isinstance(value, list) or not value:
            raise FilterError(f"{where}.{op} takes a non-empty list")
        return (op, [parse_expression(v, f"{where}.{op}[{i}]") for i, v in enumerate(value)])
    return ("all", parse_conditions(spec, where))


def _compile_node(node: Node) -> Predicate:
    if isinstance(node, Condition):
        return _compile_condition(node)
    op, value = node
    if op == "not":
        inner = _compile_node(value)
        return lambda e: not inner(e)
    parts = [_compile_node(n) for n in value]
    if op == "all":
        if len(parts) == 1:
            return parts[0]
        return lambda e: all(p(e) for p in parts)
    return lambda e: any(p(e) for p in parts)


# ------------------------------------------------------------------------------------------------
# CESQL-like expressions

_TOKEN = re.compile(r"""\s*(?:
    (?P<string>'(?:[^']|'')*')
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<op><=|>=|<>|!=|=|<|>|\(|\)|,)
  | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
)""", re.VERBOSE)
_KEYWORDS = {"AND", "OR", "NOT", "LIKE", "IN", "EXISTS", "TRUE", "FALSE"}


class _ExpressionParser:
    def __init__(self, text: str, where: str):
        self.text = text
        self.where = where
        self.tokens: list[tuple[str, Any, int]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise FilterError(f"{where}: unexpected character {text[pos:].lstrip()[:1]!r} at position {pos}")
            kind = m.lastgroup
            raw = m.group(kind)
            start = m.start(kind)
            if kind == "string":
                self.tokens.append(("value", raw[1:-1].replace("''", "'"), start))
            elif kind == "number":
                self.tokens.append(("value", float(raw) if "." in raw else int(raw), start))
            elif kind == "word" and raw.upper() in _KEYWORDS:
                upper = raw.upper()
                if upper in ("TRUE", "FALSE"):
                    self.tokens.append(("value", upper == "TRUE", start))
                else:
                    self.tokens.append(("kw", upper, start))
            elif kind == "word":
                self.tokens.append(("name", raw, start))
            else:
                self.tokens.append(("op", raw, start))
            pos = m.end()
        self.i = 0

    def fail(self, message: str) -> FilterError:
        position = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return FilterError(f"{self.where}: {message} at position {position}")

    def peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, value: Any = None) -> Any:
        token = self.peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            found = "the end" if token is None else repr(token[1])
            raise self.fail(f"expected {value or kind}, found {found}")
        self.i += 1
        return token[1]

    def accept(self, kind: str, value: Any) -> bool:
        token = self.peek()
        if token is not None and token[0] == kind and token[1] == value:
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        if not self.tokens:
            raise FilterError(f"{self.where}: the expression is empty")
        node = self.or_expr()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()[1]!r}")
        return node

    def or_expr(self) -> Node:
        parts = [self.and_expr()]
        while self.accept("kw", "OR"):
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else ("any", parts)

    def and_expr(self) -> Node:
        parts = [self.not_expr()]
        while self.accept("kw", "AND"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else ("all", parts)

    def not_expr(self) -> Node:
        if self.accept("kw", "NOT"):
            return ("not", self.not_expr())
        return self.primary()

    def primary(self) -> Node:
        if self.accept("op", "("):
            node = self.or_expr()
            self.take("op", ")")
            return node
        if self.accept("kw", "EXISTS"):
            return Condition(self.name(), "exists", True)
        name = self.name()
        if self.accept("kw", "NOT"):
            if self.accept("kw", "LIKE"):
                return ("not", Condition(name, "like", self.string()))
            self.take("kw", "IN")
            return ("not", Condition(name, "in", self.value_list()))
        if self.accept("kw", "LIKE"):
            return Condition(name, "like", self.string())
        if self.accept("kw", "IN"):
            return Condition(name, "in", self.value_list())
        token = self.peek()
        if token is None or token[0] != "op" or token[1] not in ("=", "!=", "<>", "<", "<=", ">", ">="):
            raise self.fail("expected a comparison (= != <> < <= > >= LIKE IN)")
        self.i += 1
        value = self.take("value")
        op = {"=": "eq", "!=": "ne", "<>": "ne", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}[token[1]]
        if op in ("lt", "lte", "gt", "gte") and _number(value) is None:
            raise self.fail(f"{token[1]} needs a number, got {value!r}")
        return Condition(name, op, float(value) if op in ("lt", "lte", "gt", "gte") else value)

    def name(self) -> str:
        token = self.peek()
        if token is None or token[0] != "name":
            raise self.fail("expected an attribute name")
        self.i += 1
        return _check_name(token[1], self.where)

    def string(self) -> str:
        value = self.take("value")
        if not isinstance(value, str):
            raise self.fail("LIKE takes a quoted pattern")
        return value

    def value_list(self) -> list:
        self.take("op", "(")
        values = [self.take("value")]
        while self.accept("op", ","):
            values.append(self.take("value"))
        self.take("op", ")")
        return values


# ------------------------------------------------------------------------------------------------
# What the index needs


def _decided_by_lookup(cond: Condition) -> bool:
    """Whether finding a subscription through this condition's index_key() proves the condition:
    a prefix, a suffix, or one exact string that is not number-like (the index compares numbers
    loosely, the filter strictly)."""
    if cond.index_key() is None:
        return False
    if cond.op in ("prefix", "suffix"):
        return True
    if cond.op == "eq" and isinstance(cond.value, str):
        try:
            float(cond.value)
        except ValueError:
            return True
    return False


def _glob_rest(cond: Condition, key: tuple[str, str, Any]) -> Condition:
    """A glob whose literal prefix (or suffix) the index lookup proved: what is left is the rest of
    the pattern, tested after (or before) that literal. `photos/*.jpg` leaves `*.jpg` from position
    7, which every subscription with such a tail shares, where the whole pattern is its own."""
    kind, _, literal = key
    if kind == "prefix":
        return Condition(cond.attribute, "glob-after", (len(literal), cond.value[len(literal):]))
    return Condition(cond.attribute, "glob-before", (len(literal), cond.value[:-len(literal)]))


@dataclasses.dataclass(frozen=True)
class CompiledFilter:
    predicate: Predicate
    # Conditions that must hold for any event to match (the top-level `all`): candidates for the
    # index key. An `any`/`not` contributes none.
    required: tuple[Condition, ...]
    # The filter as a conjunction (nested top-level `all`s flattened): what residual() takes from.
    conjuncts: tuple[Node, ...] = ()

    def residual(self, key: tuple[str, str, Any] | None) -> Predicate | None:
        """What is left to test of an event the index found through `key` (an index_key() of this
        filter, or None for a lookup by type or none): the filter minus the one condition the
        lookup proves; None when nothing is left."""
        parts = list(self.conjuncts)
        for i, part in enumerate(parts):
            if key is None or not isinstance(part, Condition) or part.index_key() != key:
                continue
            if _decided_by_lookup(part):
                del parts[i]
                break
            if part.op == "glob":
                parts[i] = _glob_rest(part, key)
                break
        else:
            return self.predicate if parts else None
        if not parts:
            return None
        return _compile_node(parts[0]) if len(parts) == 1 else _compile_node(("all", parts))

    def matches(self, event: Event) -> bool:
        return self.predicate(event)

    def index_key(self) -> tuple[str, str, Any] | None:
        """The most selective indexable required condition: exact, then prefix/suffix (longest)."""
        keys = [k for c in self.required if (k := c.index_key()) is not None]
        exact = [k for k in keys if k[0] == "eq"]
        if exact:
            subject = [k for k in exact if k[1] == "subject"]
            return (subject or sorted(exact, key=lambda k: k[1]))[0]
        if keys:
            return max(keys, key=lambda k: len(str(k[2])))
        return None


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else repr(value)


_SPELLING = {"eq": "=", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "like": "LIKE", "in": "IN"}


def describe(cond: Condition) -> str:
    """A condition as an operator reads it: `subject prefix 'photos/'`, `data.size > 10.0`."""
    if cond.op == "exists":
        return f"{cond.attribute} {'exists' if cond.value else 'does not exist'}"
    return f"{cond.attribute} {_SPELLING.get(cond.op, cond.op)} {cond.value!r}"


def failures(node: Node, event: Event) -> list[str]:
    """Why `node` does not hold for `event`: one line per condition at fault, naming the value the
    event had ([] when it holds). Only for explaining (GET /v1/events/{id}), never on the routing path."""
    if isinstance(node, Condition):
        if _compile_condition(node)(event):
            return []
        return [f"{describe(node)} failed: the event's {node.attribute} is {_show(attribute_getter(node.attribute)(event))}"]
    op, value = node
    if op == "not":
        return [] if failures(value, event) else [f"NOT ({_node_text(value)}) failed: the inner condition held"]
    found = [failures(n, event) for n in value]
    if op == "all":
        return [line for lines in found for line in lines]
    if all(found):  # any: every alternative failed
        return [f"none of the alternatives held: {'; '.join(line for lines in found for line in lines)}"]
    return []


def _node_text(node: Node) -> str:
    if isinstance(node, Condition):
        return describe(node)
    op, value = node
    if op == "not":
        return f"NOT ({_node_text(value)})"
    return f" {op.upper().replace('ALL', 'AND').replace('ANY', 'OR')} ".join(_node_text(n) for n in value)


def explain(filters: Any, expression: Any, event: Event) -> list[str]:
    """Why a subscription's `filters` and `filter` reject `event` ([] when they accept it)."""
    nodes: list[Node] = list(parse_conditions(filters))
    if expression is not None and expression != "":
        nodes.append(parse_expression(expression))
    return failures(("all", nodes), event)


# What one subscription's filter may cost, checked at creation: every event is matched against it.
MAX_EXPRESSION_LENGTH = 8192  # characters of a `filter` expression string
MAX_NESTING = 32  # depth of parentheses / NOT / all-any-not objects
MAX_CONDITIONS = 256  # conditions in `filters` and `filter` together
MAX_PATTERN_LENGTH = 1024  # characters of one LIKE pattern


def compile_filter(filters: Any = None, expression: Any = None) -> CompiledFilter:
    """Validate and compile a subscription's `filters` object and `filter` expression (both must
    hold). Raises FilterError naming the fault."""
    _check_cost_before_parsing(expression)
    conditions = parse_conditions(filters)
    nodes: list[Node] = list(conditions)
    required = list(conditions)
    if expression is not None and expression != "":
        node = parse_expression(expression)
        nodes.append(node)
        required.extend(_required(node))
    if not nodes:
        return CompiledFilter(lambda e: True, ())
    _check_cost(nodes)
    predicate = _compile_node(("all", nodes)) if len(nodes) > 1 else _compile_node(nodes[0])
    return CompiledFilter(predicate, tuple(required), tuple(_conjuncts(("all", nodes))))


def _check_cost_before_parsing(expression: Any) -> None:
    """Bound what parsing itself costs: the expression's length, and its nesting (the parsers recurse)."""
    if isinstance(expression, str):
        if len(expression) > MAX_EXPRESSION_LENGTH:
            raise FilterError(f"filter: the expression is {len(expression)} characters long; the limit is {MAX_EXPRESSION_LENGTH}")
        depth = nots = deepest = 0
        for token in _TOKEN.finditer(expression):
            kind, text = token.lastgroup, token.group(token.lastgroup)
            if kind == "word" and text.upper() == "NOT":
                nots += 1  # NOT NOT NOT … nests as deep as parentheses do
            else:
                nots = 0
                depth += (text == "(") - (text == ")") if kind == "op" else 0
            deepest = max(deepest, depth + nots)
        if deepest > MAX_NESTING:
            raise FilterError(f"filter: the expression nests {deepest} deep; the limit is {MAX_NESTING}")
        return
    stack = [(expression, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise FilterError(f"filter: the expression nests deeper than {MAX_NESTING}")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _check_cost(nodes: list[Node]) -> None:
    conditions = 0
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, Condition):
            conditions += 1
            if node.op == "like" and len(node.value) > MAX_PATTERN_LENGTH:
                raise FilterError(f"filter: a LIKE pattern is {len(node.value)} characters long; the limit is {MAX_PATTERN_LENGTH}")
        elif isinstance(node, tuple):
            stack.extend(node[1] if isinstance(node[1], list) else [node[1]])
        elif isinstance(node, list):
            stack.extend(node)
    if conditions > MAX_CONDITIONS:
        raise FilterError(f"filter: {conditions} conditions; the limit is {MAX_CONDITIONS}")


def _conjuncts(node: Node) -> list[Node]:
    if isinstance(node, tuple) and node[0] == "all":
        return [c for n in node[1] for c in _conjuncts(n)]
    return [node]


def _required(node: Node) -> list[Condition]:
    if isinstance(node, Condition):
        return [node]
    op, value = node
    if op == "all":
        return [c for n in value for c in _required(n)]
    return []
