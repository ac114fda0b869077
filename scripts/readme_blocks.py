#!/usr/bin/env python3
"""The code blocks of README.md that `make test` runs, by the tag in the HTML comment
before each: `<!-- readme-test: GROUP NAME -->`.

    readme_blocks.py extract GROUP NAME   print that block's text
    readme_blocks.py list                 every fenced block: its line, language and tag
    readme_blocks.py check GROUP...       every block is tagged, its group is one of GROUP
        (those make test runs), every `excerpt FILE` block is an excerpt of FILE (its
        lines, but for those with "...", appear there in the same order), and the
        `commands` block's make targets exist (make -n)
    readme_blocks.py run GROUP [--with G1,G2] [--home] [--expect TEXT]
        the group's blocks, in a new directory outside the repository: a block whose NAME
        is a file name (app.c, src/main.rs) is written there, an `sh` block is run there
        (sh -e; one named `checkout` runs in the checkout), in the README's order; the
        output must contain TEXT. --with writes the file blocks of other groups first;
        --home gives the commands a new, empty $HOME (so $HOME/.local is a temporary
        prefix). Two substitutions make the printed commands point here:
        /path/to/perturbations becomes this checkout, and $HOME/.cache/perturbations/venv
        the Makefile's venv ($README_VENV).
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


def group_blocks(group):
    return [(line, lang, tag, text) for line, lang, tag, text in blocks()
            if tag and tag.split(" ", 1)[0] == group]


def write(d, lang, name, text):
    path = os.path.join(d, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(substitute(text) if lang == "toml" else text)


def run(group, expect, with_groups=(), new_home=False):
    """Runs `group` in a fresh directory outside the repository (see the module's doc)."""
    chosen = group_blocks(group)
    if not chosen:
        sys.exit(f"README.md has no blocks tagged '{group} ...'")
    output = []
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix=f"readme-{group}-") as d, \
            tempfile.TemporaryDirectory(prefix="readme-home-") as home:
        # the programs must find their libraries by themselves (RUNPATH), as printed
        env.pop("LD_LIBRARY_PATH", None)
        if new_home:
            # a new home for the commands, with the real one's toolchains and cache
            real = os.path.expanduser("~")
            env.setdefault("RUSTUP_HOME", os.path.join(real, ".rustup"))
            env.setdefault("CARGO_HOME", os.path.join(real, ".cargo"))
            env.setdefault("PERT_CACHE", os.path.join(real, ".cache", "perturbations"))
            env["HOME"] = home
        for other in with_groups:
            for _, lang, tag, text in group_blocks(other):
                if lang != "sh":
                    write(d, lang, tag.split(" ", 1)[1], text)
        for line, lang, tag, text in chosen:
            name = tag.split(" ", 1)[1]
            if lang == "sh":
                where = ROOT if name == "checkout" else d
                print(f"README.md:{line} ({tag}), in {where}:\n{substitute(text)}", flush=True)
                done = subprocess.run(["sh", "-e", "-c", substitute(text)], cwd=where, env=env,
                                      capture_output=True, text=True)
                output.append((done.stdout, done.stderr))
                if done.returncode != 0:
                    sys.exit(f"README.md:{line} ({tag}) failed ({done.returncode}):\n"
                             + (done.stdout + done.stderr)[-4000:])
            else:
                write(d, lang, name, text)
                if lang == "python":
                    # a Python block is a script: run by the venv's python, the package
                    # found as installed (no PERTURBATIONS_LIB)
                    python = os.environ.get("README_PYTHON", sys.executable)
                    penv = {k: v for k, v in env.items() if k != "PERTURBATIONS_LIB"}
                    print(f"README.md:{line} ({tag}): {python} {name}", flush=True)
                    done = subprocess.run([python, name], cwd=d, env=penv,
                                          capture_output=True, text=True)
                    output.append((done.stdout, done.stderr))
                    if done.returncode != 0:
                        sys.exit(f"README.md:{line} ({tag}) failed ({done.returncode}):\n"
                                 + (done.stdout + done.stderr)[-4000:])
    printed = "".join(o for o, _ in output)
    print("\n".join(printed.strip().split("\n")[-3:]))
    if expect and expect not in printed + "".join(e for _, e in output):
        sys.exit(f"README group '{group}': the output lacks '{expect}'")


# The languages a block may have: `sh` blocks run, the others are files (or, for julia,
# checked statically); any other tag (bash, console, ...) would never run, so it is refused.
LANGUAGES = {"sh", "c", "cpp", "rust", "toml", "python", "cmake", "julia"}


def check(groups):
    """See the module's doc: fails naming each block that is untested or out of date."""
    problems = []
    runs = {}
    for line, lang, tag, text in blocks():
        if lang not in LANGUAGES:
            problems.append(f"README.md:{line}: a ```{lang} block: use one of {sorted(LANGUAGES)}")
        if tag and lang in ("sh", "python"):
            runs[tag.split(" ", 1)[0]] = True
        if tag is None:
            problems.append(f"README.md:{line}: a ```{lang} block with no readme-test tag")
            continue
        group, name = (tag.split(" ", 1) + [""])[:2]
        if group not in groups:
            problems.append(f"README.md:{line}: group '{group}' is not run by make test")
        if group == "commands":
            # the README's two commands: make test is the caller itself, so each is
            # checked to be a target whose recipe resolves (make -n), not run again
            for command in text.split("\n"):
                words = command.split("#")[0].split()
                if words[:1] == ["make"]:
                    done = subprocess.run(["make", "-n"] + words[1:], cwd=ROOT,
                                          capture_output=True, text=True)
                    if done.returncode != 0:
                        problems.append(f"README.md:{line}: '{' '.join(words)}' is not a "
                                        f"target: {done.stderr.strip()[-300:]}")
        if group == "excerpt":
            source = open(os.path.join(ROOT, name), encoding="utf-8").read().split("\n")
            at = 0
            for wanted in text.rstrip("\n").split("\n"):
                if "..." in wanted or not wanted.strip():
                    continue
                while at < len(source) and source[at].rstrip() != wanted.rstrip():
                    at += 1
                if at == len(source):
                    problems.append(f"README.md:{line}: '{wanted.strip()}' is not in {name} "
                                    "(in this order)")
                    break
                at += 1
    # a group of files that nothing runs would pass without testing them
    for line, lang, tag, _ in blocks():
        group = tag.split(" ", 1)[0] if tag else None
        if group in groups and group not in ("julia", "excerpt", "commands") and not runs.get(group):
            problems.append(f"README.md:{line}: group '{group}' has no sh or python block to run it")
    if problems:
        sys.exit("\n".join(problems))
    print(f"README.md: {len(blocks())} blocks, each tagged and run or checked")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "check":
        check(sys.argv[2:] + ["excerpt"])
        return
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        args = sys.argv[3:]
        expect = args[args.index("--expect") + 1] if "--expect" in args else None
        groups = args[args.index("--with") + 1].split(",") if "--with" in args else []
        run(sys.argv[2], expect, groups, "--home" in args)
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
