"""`[schedule] full_scan`: a 5-field cron expression, checked whole at load.

The watcher hands the expression to APScheduler, which raised ValueError for `61 3 * *
*` only when the daemon (re)scheduled it, after the policy had been accepted: a SIGHUP
killed the watcher. So every field is checked here, with cron's meaning, and the
expression is rewritten into a form APScheduler reads with that same meaning:

- day of week is cron's 0-7 (0 and 7 Sunday) or sun-sat. APScheduler counts 0 as
  Monday, so `0 3 * * 0` would run on Mondays and `1-5` Tuesday to Saturday: the
  field is rewritten as day names. Fields APScheduler would refuse or misread (a step
  longer than its range, `*/60`; month names, whose step `jan-dec/2` it drops) are
  rewritten as the list of what they select; the others stay as written.
- cron runs a job whose day of month and day of week are both restricted on either
  day; APScheduler on days that are both. Such an expression is refused rather than
  run on other days than the admin meant.
- a day that no month selected has (`0 3 30 2 *`) would never run: refused.
"""

from __future__ import annotations

import re

#: (name, lowest, highest) of the five fields, in order.
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
          ("month", 1, 12), ("day of week", 0, 7))
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
          "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
#: Longest month lengths (February's in a leap year).
MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_ITEM = re.compile(r"(?P<range>\*|(?P<first>\w+)(?:-(?P<last>\w+))?)(?:/(?P<step>\d+))?")


class CronError(ValueError):
    """What is wrong with an expression, for a message naming the policy key."""


def _value(text: str, field: int) -> int:
    name, low, high = FIELDS[field]
    names = MONTHS if field == 3 else DAYS if field == 4 else ()
    if text.lower() in names:
        return names.index(text.lower()) + (1 if field == 3 else 0)
    if not text.isdigit():
        raise CronError(f"{name} {text!r} is not a number"
                        + (f" or a name ({names[0]}-{names[-1]})" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{name} {value} is out of range {low}-{high}")
    return value


def _expand(text: str, field: int) -> tuple[set[int], bool]:
    """The values one field selects, and whether APScheduler reads the field as written
    with the same meaning (numbers only, and no step longer than its range, which
    APScheduler refuses: `*/60`, `1-1/1`)."""
    name, low, high = FIELDS[field]
    selected: set[int] = set()
    as_written = True
    for item in text.split(","):
        match = _ITEM.fullmatch(item)
        if not match:
            raise CronError(f"{name} {item!r} is not *, N, N-M or one of them /STEP")
        if match["range"] == "*":
            first, last = low, high
        else:
            first = _value(match["first"], field)
            last = _value(match["last"], field) if match["last"] else first
            if last < first:
                raise CronError(f"{name} range {item!r} runs backwards")
            if match["step"] and not match["last"]:
                raise CronError(f"{name} {item!r}: a step needs * or a range (N-M/STEP)")
        step = int(match["step"]) if match["step"] else 1
        if step < 1:
            raise CronError(f"{name} {item!r}: the step must be at least 1")
        selected.update(range(first, last + 1, step))
        as_written = as_written and not re.search(r"[a-zA-Z]", item) \
            and (not match["step"] or step <= last - first)
    return selected, as_written


def normalize(expr: str) -> str:
    """The expression with cron's meaning, as APScheduler's from_crontab reads it.

    Raises CronError saying which field is wrong and why.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise CronError(f"not a 5-field cron expression (minute hour day-of-month "
                        f"month day-of-week): {expr!r}")
    expanded = [_expand(text, index) for index, text in enumerate(fields)]
    values = [selected for selected, _ in expanded]
    weekdays = {day % 7 for day in values[4]}
    # cron's own test (a field "restricts" unless it starts with *), so that
    # `0 3 */2 * 1` keeps meaning both, as in cron.
    if not fields[2].startswith("*") and not fields[4].startswith("*"):
        raise CronError(f"{expr!r} restricts both the day of month and the day of week, "
                        "which cron reads as either day; set one of them to *")
    longest = max(MONTH_DAYS[month - 1] for month in values[3])
    if min(values[2]) > longest:
        raise CronError(f"{expr!r} never runs: no month it names has day "
                        f"{min(values[2])}")
    # Fields APScheduler reads as cron does stay as written; the others become the
    # list of what they select.
    out = [text if as_written else ",".join(str(v) for v in sorted(selected))
           for text, (selected, as_written) in zip(fields[:4], expanded)]
    out.append("*" if weekdays == set(range(7))
               else ",".join(DAYS[day] for day in sorted(weekdays)))
    return " ".join(out)
