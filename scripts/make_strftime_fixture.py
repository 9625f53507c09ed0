"""What transformers' `strftime_now(format)` prints at fixed instants, for the chat
template's strftime (trl_like/src/chat_template.rs).

transformers calls `datetime.now().strftime(format)`: a naive local datetime, so
`%z` and `%Z` print nothing and every other directive goes to the C library's
strftime (glibc, C locale). The instants below are naive datetimes; the formats
are the ones chat templates use (Llama 3.x "%d %b %Y", Mistral "%Y-%m-%d",
Granite "%B %d, %Y", ...) plus every directive the Rust side handles.

Run: .venv/bin/python scripts/make_strftime_fixture.py
"""
import json
import os
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INSTANTS = [
    datetime(2024, 7, 26, 15, 4, 5, 123456),
    datetime(2000, 1, 1, 0, 30, 0),
    datetime(1999, 12, 31, 23, 59, 59, 999999),
    datetime(2024, 2, 29, 12, 0, 7, 42),
    datetime(2021, 1, 3, 9, 8, 7),  # ISO week 53 of 2020
    datetime(1970, 1, 1, 0, 0, 0),
    datetime(2038, 1, 19, 3, 14, 8),
]

FORMATS = [
    "%d %b %Y",
    "%Y-%m-%d",
    "%B %d, %Y",
    "%A, %B %d, %Y",
    "%Y %y %C %m %d %e %H %I %M %S %p %B %b %h %A %a %j %w %u",
    "%F %T %D %R %r",
    "%c | %x | %X",
    "%-d %-m %-H %-I %-M %-S %-j %-y",
    "%_d %_m %_H %0e %k %l %P",
    "%U %W %V %G %g",
    "%f",
    "[%z][%Z]",
    "%% %n%t|",
    "%Q %L %Ey %Oy %^a %^B",
    "no directives at all",
    "Today is %d %b %Y.\n",
    "日期：%Y年%m月%d日 %H時",
]


def main():
    cases = []
    for t in INSTANTS:
        for fmt in FORMATS:
            cases.append({"datetime": t.isoformat(), "format": fmt, "output": t.strftime(fmt)})
    path = os.path.join(ROOT, "tests/fixtures/strftime.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
