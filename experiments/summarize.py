"""Tables of eval.json files under a sweep directory: one row per run (SFT stages as <run>/sft), and mean +- std
over seed suffixes _s0, _s1, ... Usage: python experiments/summarize.py OUT_DIR"""
import glob
import json
import os
import re
import statistics
import sys


def rows(root):
    for path in sorted(glob.glob(os.path.join(root, "**", "eval.json"), recursive=True)):
        run = os.path.relpath(os.path.dirname(path), root)
        for split, m in json.load(open(path)).items():
            yield run, split, m


def main(root):
    groups = {}
    print("| run | split | accuracy | macro_f1 | format_valid | rule_consistency | longtail_facet_acc |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run, split, m in rows(root):
        print(f"| {run} | {split} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['format_valid']:.3f} | "
              f"{m['rule_consistency']:.3f} | {m.get('longtail_facet_accuracy', float('nan')):.3f} |")
        key = (re.sub(r"_s\d+", "", run), split)
        groups.setdefault(key, []).append(m)
    print("\n| group (mean +- std over seeds) | split | n | accuracy | macro_f1 |")
    print("|---|---|---:|---:|---:|")
    for (g, split), ms in sorted(groups.items()):
        if len(ms) < 2:
            continue
        f = lambda k: f"{statistics.mean(m[k] for m in ms):.3f} +- {statistics.stdev(m[k] for m in ms):.3f}"  # noqa: E731
        print(f"| {g} | {split} | {len(ms)} | {f('accuracy')} | {f('macro_f1')} |")


if __name__ == "__main__":
    main(sys.argv[1])
