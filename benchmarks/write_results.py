"""How a benchmark or evaluation script leaves its results: ``<stem>.json`` (everything) and ``<stem>.md``
(the tables) in the output folder, which is made if absent. Scripts run from this folder import it."""

import json
import os


def save(out: str, stem: str, data, markdown: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
