#!/usr/bin/env python3
"""Read TensorBoard event files with the real `tensorboard` package and print
what TensorBoard itself sees, as JSON on stdout.

Usage: check_tensorboard.py PATH      (an event file or a logging directory)

Output:
  {"file_version": 2.0,                                      # parsed from "brain.Event:2"
   "scalars": {"train/loss": [[step, value], ...], ...},   # tags the Scalars dashboard lists
   "texts":   {"predictions/text_summary": [[step, "text"], ...], ...}}  # tags the Text dashboard lists

It uses `plugin_event_accumulator`, the loader behind the TensorBoard server:
a scalar only counts if TensorBoard files it under the "scalars" plugin, and a
text only if it is filed under the "text" plugin. The Rust test
`trl_like/tests/tracking.rs` runs this (when tensorboard is installed) and
compares the output with what it wrote.
"""

import json
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(sys.argv[1], size_guidance={pea.TENSORS: 0})
    acc.Reload()

    def values(tag):
        return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]

    scalars = {
        tag: [[step, float(arr.item())] for step, arr in values(tag)]
        for tag in sorted(acc.PluginTagToContent("scalars"))
    }
    texts = {}
    for tag in sorted(acc.PluginTagToContent("text")):
        texts[tag] = []
        for step, arr in values(tag):
            # A DT_STRING tensor comes back as an object array of bytes; add_text writes shape [1].
            items = [s.decode("utf-8") for s in arr.reshape(-1).tolist()]
            texts[tag].append([step, "\n".join(items)])

    json.dump(
        {"file_version": acc.file_version, "scalars": scalars, "texts": texts},
        sys.stdout,
        ensure_ascii=False,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
