#!/usr/bin/env python3
"""The code blocks of README.md that `make test` runs, by the tag in the HTML comment
before each: `<!-- readme-test: GROUP NAME -->`.

    readme_blocks.py extract GROUP NAME   print that block's text
    readme_blocks.py list                 every fenced block: its line, language and tag
"""
import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def blocks():
    """(line, language, tag or None, text) of every fenced block, in order."""
    lines = open(README, encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)$", lines[i])
        if not m:
            i += 1
            continue
        tag = None
        j = i - 1
        while j >= 0 and lines[j].strip() == "":
            j -= 1
        t = re.match(r"^<!-- readme-test: (.+?) -->$", lines[j].strip()) if j >= 0 else None
        if t:
            tag = t.group(1)
        end = i + 1
        while end < len(lines) and lines[end] != "```":
            end += 1
        out.append((i + 1, m.group(1), tag, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return out


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "list":
        for line, lang, tag, _ in blocks():
            print(f"{line}\t{lang}\t{tag or '-'}")
        return
    if len(sys.argv) == 4 and sys.argv[1] == "extract":
        want = f"{sys.argv[2]} {sys.argv[3]}"
        found = [text for _, _, tag, text in blocks() if tag == want]
        if len(found) != 1:
            sys.exit(f"README.md has {len(found)} blocks tagged '{want}', not one")
        sys.stdout.write(found[0])
        return
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
