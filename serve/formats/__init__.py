"""xsilo's on-disk formats: the bottom floor of the project, torch-free.

One module per format, its reader and its writer side by side, each with a small config dataclass
(`to_dict`/`from_dict`), a `format_version`, and the migrations that bring an older version up to it:

    digests.py        sha256 of a file, the fingerprint of texts (and of a labelled dataset)
    splits.py         SplitSpec: the task split (train/val/test 0.70/0.15/0.15, seed 0) and the public train/val
                      split (0.875/0.125), and their index math; `SPLIT` is the one default everyone reads
    folders.py        what every folder shares: JSON header, sha256 records, atomic staging, ExportError
    exports.py        the export folder (fused map+head, `xsilo export`) and `LinearExport`; the map folder's reader
    heads.py          the head folder (`xsilo head fit`): a head-only export and its feature-space OOD detector
    maps.py           the map folder (`config.json` + `model.safetensors`)
    public_states.py  the provider's public-states folder (`xsilo public-set export`)

The rule: a module here imports numpy, the standard library, safetensors/onnx/huggingface_hub (inside the
function that needs them) and `encrypted` at most: never torch, lightning, transformers, `datamodules`,
`lightning_modules` or the rest of `serve`. The server, both clients, the DataModules and the LightningModules
import it; it imports none of them (`tests/test_layering.py` checks it).
"""
