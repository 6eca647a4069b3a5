"""evaluate.py's output directory: the settings its rows were made with, the rows finished
there (also by a run that crashed), and writing them back.

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
