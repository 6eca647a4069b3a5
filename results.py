"""evaluate.py's output directory: the settings its rows were made with, the rows finished
there (also by a run that crashed), writing them back, and the summary tables (accuracy and
consistency per benchmark, level, domain and question type) and their comparison.

    OUTPUT/eval_settings.json           {"hash": ..., "settings": {flag: value}}, written first
    OUTPUT/predictions.part<rank>.jsonl  rows a process appends as it goes
    OUTPUT/predictions.jsonl            every finished row, merged at the end of a run
    OUTPUT/summary.json, summary.md     the tables of the last run

Every row carries the hash of the settings it was made with; a row with another hash is never
reused, and a directory whose recorded settings differ from a run's is refused.
"""

import glob
import hashlib
import json
import os
import sys
from collections import defaultdict

import data

SETTINGS_FILE = "eval_settings.json"
HINT = "pick another --output-dir, or pass --overwrite to delete its results and start over"


def settings_hash(settings):
    """A short fingerprint of the settings, written with every row."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def part_files(output_dir):
    return sorted(glob.glob(os.path.join(output_dir, "predictions.part*.jsonl")))


def results_in(output_dir):
    """The rows and summaries of earlier runs. Not the settings file: while the other processes
    check the directory, the main process may already be writing this run's."""
    names = ("predictions.jsonl", "summary.json", "summary.md")
    return [p for p in (os.path.join(output_dir, n) for n in names) if os.path.exists(p)] + part_files(output_dir)


def check_output_dir(output_dir, settings):
    """Refuse to resume in a directory whose rows were made under other settings: they would be
    reported as this run's. One line names each setting that changed."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        if results_in(output_dir):
            raise SystemExit(f"{output_dir} holds results without the {SETTINGS_FILE} that says how they "
                             f"were made: {HINT}")
        return
    try:
        with open(path) as f:
            old = json.load(f)["settings"]
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {settings.get(k)}"
                   for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: unreadable ({type(e).__name__}: {e}): {HINT}") from None
    if changed:
        raise SystemExit(f"{output_dir} holds results made with other settings ({'; '.join(changed)}): {HINT}")


def start_output_dir(output_dir, settings, overwrite):
    """On the main process, before any row: with overwrite, delete the earlier results; then
    record the settings."""
    if overwrite:
        for path in results_in(output_dir):
            os.remove(path)
    os.makedirs(output_dir, exist_ok=True)
    write_atomic(os.path.join(output_dir, SETTINGS_FILE),
                 json.dumps({"hash": settings_hash(settings), "settings": settings}, indent=2) + "\n")


def read_rows(path):
    """Rows of a predictions file. A last line cut short by a crash is left out (that sample is
    evaluated again); a bad line anywhere else is an error."""
    with open(path) as f:
        lines = f.read().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise data.DataError(f"{path}:{i + 1}: not a JSON row; remove the file to start over") from None
            print(f"{path}:{i + 1}: incomplete last row left out; that sample is evaluated again", file=sys.stderr)
    return rows


def finished_rows(output_dir, tag):
    """Rows already written under these settings (tag: their hash) by earlier runs, in the merged
    file and any part files, by key; and how many rows were left out for other settings."""
    done, other = {}, 0
    for path in [os.path.join(output_dir, "predictions.jsonl")] + part_files(output_dir):
        for row in read_rows(path) if os.path.exists(path) else []:
            if row.get("settings") == tag:
                done[row["key"]] = row
            else:
                other += 1
    return done, other


def save_rows(output_dir, by_key, order):
    """predictions.jsonl: every finished row, in work order (rows of other files, or beyond
    --limit, that earlier runs left come after); then the part files, all in it, can go."""
    rows = sorted(by_key.values(), key=lambda r: order.get(r["key"], len(order)))
    write_atomic(os.path.join(output_dir, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    for path in part_files(output_dir):
        os.remove(path)


def write_atomic(path, text):
    """Through a temporary file and a rename: a crash never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Summary and comparison


def group_names(row):
    """The table rows a prediction counts in."""
    names = ["all", row["benchmark"]]
    if row["domain"]:
        names.append(f"{row['benchmark']}/{row['domain']}")
    if row["level"] is None:  # Video-R1-style file: also per question type
        names.append(f"{row['benchmark']}/{row['problem_type']}")
    return names


def summarize(rows, judged=True):
    groups = defaultdict(list)
    for r in rows:
        for name in group_names(r):
            groups[name].append(r)
    summary = {}
    for name in sorted(groups, key=lambda n: (n != "all", n)):  # none when every sample was skipped
        rs = groups[name]
        s = {"n": len(rs), "accuracy": 100.0 * sum(r["score"] for r in rs) / len(rs),
             "format": 100.0 * sum(r["format_ok"] for r in rs) / len(rs)}
        if judged:
            judged_rows = [r for r in rs if r["consistent"] is not None]
            s.update(judged=len(judged_rows), consistent=sum(r["consistent"] for r in judged_rows),
                     undecided=sum(r["verdict"] is None for r in judged_rows),
                     consistency=(100.0 * sum(r["consistent"] for r in judged_rows) / len(judged_rows)
                                  if judged_rows else None))
        summary[name] = s
    return summary


def pct(x):
    return "-" if x is None else f"{x:.1f}"


def format_table(summary):
    lines = ["| split | n | accuracy (%) | format (%) | consistency (%) | judged | undecided |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.1f} | {s['format']:.1f} | "
                     f"{pct(s.get('consistency'))} | {s.get('judged', '-')} | {s.get('undecided', '-')} |")
    return "\n".join(lines)


def read_summary(path):
    """A summary.json written by evaluate.py; a missing or malformed one stops with one line."""
    try:
        with open(path) as f:
            summary = json.load(f)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"{path}: not JSON: {e}") from None
    if not (isinstance(summary, dict) and "model" in summary and isinstance(summary.get("results"), dict)
            and all(isinstance(r, dict) for r in summary["results"].values())):
        raise SystemExit(f'{path}: not a summary written by evaluate.py (no "model" or no "results" table)')
    for name, row in summary["results"].items():
        for key in ("n", "accuracy", "consistency"):
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SystemExit(f"{path}: results[{name!r}][{key!r}] is {value!r}, not a number")
    return summary


def scoring_of(summary):
    """The rules a summary was scored by (evaluate.py --scoring); summaries from before the flag
    existed were scored by ours."""
    return (summary.get("settings") or {}).get("scoring", "ours")


def compare(path_a, path_b):
    """Side-by-side accuracy and consistency of two runs, with B - A. Summaries scored by
    different rules are not comparable: refused, naming both."""
    a, b = read_summary(path_a), read_summary(path_b)
    if scoring_of(a) != scoring_of(b):
        raise SystemExit(f"{path_a} was scored by the {scoring_of(a)} rules and {path_b} by the {scoring_of(b)} "
                         f"rules (evaluate.py --scoring): evaluate both with the same rules to compare them")
    names = list(a["results"]) + [n for n in b["results"] if n not in a["results"]]

    def cells(name, key):
        x, y = (run["results"].get(name, {}).get(key) for run in (a, b))
        delta = "-" if x is None or y is None else f"{y - x:+.1f}"
        return f"{pct(x)} | {pct(y)} | {delta}"

    lines = [f"A: {a['model']}", f"B: {b['model']}", f"scoring: {scoring_of(a)} rules", "",
             "| split | n (A / B) | accuracy A | accuracy B | delta | consistency A | consistency B | delta |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        n = " / ".join(str(run["results"].get(name, {}).get("n", "-")) for run in (a, b))
        lines.append(f"| {name} | {n} | {cells(name, 'accuracy')} | {cells(name, 'consistency')} |")
    return "\n".join(lines)
