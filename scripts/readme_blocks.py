#!/usr/bin/env python3
"""The code blocks of README.md that `make test` runs, by the tag in the HTML comment
before each: `<!-- readme-test: GROUP NAME -->`.

    readme_blocks.py extract GROUP NAME   print that block's text
    readme_blocks.py list                 every fenced block: its line, language and tag
    readme_blocks.py run GROUP [--expect TEXT]
        the group's blocks, in a new directory outside the repository: a block whose NAME
        is a file name (app.c, src/main.rs) is written there, an `sh` block is run there
        (sh -e), in the README's order; the output must contain TEXT. Two substitutions
        make the printed commands point here: /path/to/perturbations becomes this
        checkout, and $HOME/.cache/perturbations/venv the Makefile's venv ($README_VENV).
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


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


def substitute(text):
    text = text.replace("/path/to/perturbations", ROOT)
    venv = os.environ.get("README_VENV")
    if venv:
        text = text.replace("$HOME/.cache/perturbations/venv", venv)
    return text


def run(group, expect):
    """Runs `group` in a fresh directory outside the repository (see the module's doc)."""
    chosen = [(line, lang, tag, text) for line, lang, tag, text in blocks()
              if tag and tag.split(" ", 1)[0] == group]
    if not chosen:
        sys.exit(f"README.md has no blocks tagged '{group} ...'")
    output = []
    with tempfile.TemporaryDirectory(prefix=f"readme-{group}-") as d:
        for line, lang, tag, text in chosen:
            name = tag.split(" ", 1)[1]
            if lang == "sh":
                print(f"README.md:{line} ({tag}), in {d}:\n{substitute(text)}", flush=True)
                done = subprocess.run(["sh", "-e", "-c", substitute(text)], cwd=d,
                                      capture_output=True, text=True)
                output.append((done.stdout, done.stderr))
                if done.returncode != 0:
                    sys.exit(f"README.md:{line} ({tag}) failed ({done.returncode}):\n"
                             + (done.stdout + done.stderr)[-4000:])
            else:
                path = os.path.join(d, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(substitute(text) if lang in ("toml",) else text)
    printed = "".join(o for o, _ in output)
    print("\n".join(printed.strip().split("\n")[-3:]))
    if expect and expect not in printed + "".join(e for _, e in output):
        sys.exit(f"README group '{group}': the output lacks '{expect}'")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        expect = sys.argv[sys.argv.index("--expect") + 1] if "--expect" in sys.argv else None
        run(sys.argv[2], expect)
        return
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
