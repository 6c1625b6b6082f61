"""``python -m itmzoo.models --write-index``: regenerate itmzoo/models/index.json from the declarations."""

import sys

from ..registry import INDEX_COMMAND
from . import write_index

if sys.argv[1:] != ["--write-index"]:
    raise SystemExit(f"usage: {INDEX_COMMAND}")
print(f"wrote {write_index()}")
