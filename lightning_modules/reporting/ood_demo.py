"""Demo stage 6's client-side check: which OOD detector the deployment runs, and its flags on samples.

    python -m lightning_modules.reporting.ood_demo --export runs/demo/export-ood --ood runs/demo/ood

Prints the fused-mode candidates with their validation and test AUROCs and the one chosen, then
flags sample texts, two in-distribution (movie snippets) and four clearly out of it, exactly as a
client would: its own states for a state detector, the (here locally computed) fused logits for a
logit detector. Every miss is printed as a miss. Writes OOD/samples.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLES = [  # (text, is OOD)
    ("A gorgeous, witty, seductive movie.", False),
    ("The plot is a mess and the acting is even worse.", False),
    ("What is the capital of Australia ?", True),  # a TREC question
    ("The city council approved the new budget on Tuesday.", True),  # a news sentence
    ("How many calories are there in a banana ?", True),  # a TREC question
    ("This blender broke after two weeks and the seller never answered my emails.", True),  # a product review
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="the export with OOD thresholds (xsilo export --ood)")
    parser.add_argument("--ood", required=True, help="the `xsilo evaluate_ood --out` folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from datamodules.cache import atomic_write_json
    from datamodules.encoder import StateEncoder
    from serve.formats.exports import load_export
    from serve.ood_client import ood_from_logits
    from lightning_modules.evaluation.ood_select import LOGIT_CANDIDATES, load_state_detector

    run = Path(args.ood)
    results = json.loads((run / "ood.json").read_text())
    sel, sets = results["deployable"], list(results["ood"])
    print(f"detectors a fused-mode client can run, by mean validation AUROC ({', '.join(sets)}):")
    for name, c in sorted(sel["candidates"].items(), key=lambda kv: -kv[1]["val_auroc_mean"]):
        tests = ", ".join(f"{s} {c['test'][s]['auroc']:.3f}" for s in sets)
        print(f"  {'*' if name == sel['chosen'] else ' '} {name:20s} val {c['val_auroc_mean']:.3f}   test: {tests}")
    print(f"chosen: {sel['reason']}")

    fused = load_export(args.export)
    src = fused.manifest["source"]
    encode = StateEncoder(src["model"], pooling=src["pooling"], layer=src["layer"], max_length=src["max_length"],
                          threads=args.threads)
    texts = [t for t, _ in SAMPLES]
    states = encode(texts)
    if sel["chosen"] in LOGIT_CANDIDATES:
        ood = fused.manifest["ood"]
        scores, flags = ood_from_logits(fused(states), ood, detector=sel["chosen"].split("@")[0])
        how = f"{sel['chosen']} on decrypted logits > {ood['all'][sel['chosen'].split('@')[0]]:.3f}"
    else:
        detector = load_state_detector(run / "client-ood.npz")
        scores, flags = detector.score(states), detector.flags(states)
        how = f"{detector.name} on the client's own {src['model']} states > {detector.threshold:.3f}"
    tpr = sel["tpr"]
    print(f"client-side OOD check: {how} (keeps {tpr:.0%} of ID validation)")
    right = 0
    misses = []
    for (text, is_ood), score, flag in zip(SAMPLES, scores, flags):
        ok = bool(flag) == is_ood
        right += ok
        verdict = "right" if ok else ("MISSED: an OOD text passed as in-distribution" if is_ood
                                      else "WRONG: an in-distribution text flagged")
        if not ok:
            misses.append(text)
        print(f"  {'OOD' if flag else 'in '}  {score:+10.3f}  (truly {'OOD' if is_ood else 'in '}: {verdict})  {text}")
    if misses:
        print(f"the detector gets {right}/{len(SAMPLES)} samples right; it misses {len(misses)}: "
              + "; ".join(repr(t) for t in misses))
    else:
        print(f"the detector gets all {len(SAMPLES)} samples right")
    atomic_write_json(run / "samples.json", {"detector": sel["chosen"], "right": right, "total": len(SAMPLES),
                                             "samples": [{"text": t, "ood": o, "flagged": bool(f), "score": float(s)}
                                                         for (t, o), f, s in zip(SAMPLES, flags, scores)]})


if __name__ == "__main__":
    main()
