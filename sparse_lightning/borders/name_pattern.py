"""Module-name patterns read from files (PEFT's `target_modules` regex string), matched in time linear in the name.

PEFT selects modules with `re.fullmatch(target_modules, name)` when `target_modules` is a string. Python's engine
backtracks, so a crafted `adapter_config.json` (`"(.*.*)*Z"`) would hang whoever reads it. Here the pattern is parsed
by Python's own parser (linear in its length), compiled to a Thompson NFA of at most `MAX_STATES` states and run as
a lazily built DFA: the same answers as `re.fullmatch` on module names, in time linear in the name for any pattern.
What needs backtracking or has no use in a module name (backreferences, lookarounds, conditionals, possessive or
atomic groups, word boundaries, inline flags) is refused with `NamePatternError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

try:  # Python >= 3.11
    from re import _constants as sre, _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

#: NFA states a pattern may compile to (`a{1000}{1000}` would need a million): far above any real target list.
MAX_STATES = 20_000
#: DFA transitions cached per pattern before the cache starts over (bounds memory; time stays linear).
MAX_CACHED = 100_000

_CHAR, _SPLIT, _START, _END, _MATCH = range(5)
_CATEGORIES: dict[object, Callable[[str], bool]] = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    sre.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    sre.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
}
_STARTS = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
_ENDS = (sre.AT_END, sre.AT_END_STRING)


def _shown(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 80 else pattern[:77] + "...")


class NamePatternError(ValueError):
    """A pattern that is not valid, or uses what a linear-time matcher cannot do."""


class NamePattern:
    """`NamePattern(pattern).fullmatch(name)` is `re.fullmatch(pattern, name) is not None` for module names, in
    O(len(name)) steps."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        try:
            parsed = sre_parse.parse(pattern)
        except re.error as error:
            raise NamePatternError(f"{_shown(pattern)} is not a valid regular expression ({error})") from None
        except RecursionError:
            raise NamePatternError(f"{_shown(pattern)} nests groups too deeply") from None
        if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
            raise NamePatternError(f"{_shown(pattern)}: inline flags such as (?i) are not supported in module patterns")
        self._kind: list[int] = []
        self._arg: list[Callable[[str], bool] | None] = []
        self._out: list[list[int]] = []
        try:
            self._start = self._sequence(list(parsed), self._add(_MATCH, None, []))
        except RecursionError:
            raise NamePatternError(f"{_shown(pattern)} nests groups too deeply") from None
        self._initial = self._closure([self._start], at_start=True, at_end=False)
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def fullmatch(self, name: str) -> bool:
        current = self._initial
        for ch in name:
            key = (current, ch)
            following = self._steps.get(key)
            if following is None:
                if len(self._steps) >= MAX_CACHED:
                    self._steps.clear()
                following = self._steps[key] = self._closure(
                    [self._out[s][0] for s in current if self._kind[s] == _CHAR and self._arg[s](ch)],
                    at_start=False, at_end=False)
            if not following:
                return False
            current = following
        return any(self._kind[s] == _MATCH for s in self._closure(current, at_start=not name, at_end=True))

    # ---------------------------------------------------------------------------------------------- running

    def _closure(self, states, at_start: bool, at_end: bool) -> frozenset[int]:
        """`states` and all reachable without reading a character; an anchor that does not hold here stays in the
        set unexpanded (an end anchor may hold once the name ends)."""
        seen: set[int] = set()
        stack = list(states)
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            kind = self._kind[state]
            if kind == _SPLIT or (kind == _START and at_start) or (kind == _END and at_end):
                stack.extend(self._out[state])
        return frozenset(seen)

    # ---------------------------------------------------------------------------------------------- compiling

    def _add(self, kind: int, arg: Callable[[str], bool] | None, out: list[int]) -> int:
        if len(self._kind) >= MAX_STATES:
            raise NamePatternError(f"{_shown(self.pattern)} is too large (over {MAX_STATES} states once its repeats "
                                   "are expanded)")
        self._kind.append(kind)
        self._arg.append(arg)
        self._out.append(out)
        return len(self._kind) - 1

    def _sequence(self, items: list, next_state: int) -> int:
        for item in reversed(items):
            next_state = self._item(item, next_state)
        return next_state

    def _item(self, item, next_state: int) -> int:
        op, av = item
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            return self._add(_CHAR, self._predicate(op, av), [next_state])
        if op is sre.BRANCH:
            return self._add(_SPLIT, None, [self._sequence(list(branch), next_state) for branch in av[1]])
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise NamePatternError(f"{_shown(self.pattern)}: inline flags such as (?i:...) are not supported")
            return self._sequence(list(body), next_state)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: the same set of full matches
            low, high, body = av
            body = list(body)
            if high is sre.MAXREPEAT:
                loop = self._add(_SPLIT, None, [])
                self._out[loop] = [self._sequence(body, loop), next_state]
                next_state = loop
            else:
                for _ in range(high - low):
                    next_state = self._add(_SPLIT, None, [self._sequence(body, next_state), next_state])
            for _ in range(low):
                next_state = self._sequence(body, next_state)
            return next_state
        if op is sre.AT and av in _STARTS:
            return self._add(_START, None, [next_state])
        if op is sre.AT and av in _ENDS:
            return self._add(_END, None, [next_state])
        what = f"{op} {av}" if op is sre.AT else str(op)
        raise NamePatternError(f"{_shown(self.pattern)} uses {what.lower()}, which module patterns do not support "
                               "(backreferences, lookarounds, conditionals, atomic or possessive groups, word "
                               "boundaries); list the module names instead")

    def _predicate(self, op, av) -> Callable[[str], bool]:
        if op is sre.LITERAL:
            return chr(av).__eq__
        if op is sre.NOT_LITERAL:
            return chr(av).__ne__
        if op is sre.ANY:
            return "\n".__ne__
        negate = bool(av) and av[0][0] is sre.NEGATE
        tests = []
        for kind, value in av[1:] if negate else av:
            if kind is sre.LITERAL:
                tests.append(chr(value).__eq__)
            elif kind is sre.RANGE:
                low, high = chr(value[0]), chr(value[1])
                tests.append(lambda ch, low=low, high=high: low <= ch <= high)
            elif kind is sre.CATEGORY and value in _CATEGORIES:
                tests.append(_CATEGORIES[value])
            else:
                raise NamePatternError(f"{_shown(self.pattern)}: the character class item {kind} is not supported")
        return lambda ch: any(test(ch) for test in tests) != negate
