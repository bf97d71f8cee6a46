"""``gradaudit``'s command line, in which one rank of a torchrun group kills itself (SIGKILL, as a lost
node) right after it has written its first statistics chunk (KILL_AT=chunk) or its first partial
reference sums (KILL_AT=part); every other rank runs the command unchanged. Rank KILL_RANK dies.

    torchrun --nproc_per_node=2 tests/capture/kill_rank.py extract --model … --run … --set …
"""

import os
import signal
import sys

from gradaudit.cli import main
from gradaudit.store.runfolder import RunFolder

if os.environ.get("RANK") == os.environ["KILL_RANK"]:
    method = {"chunk": "save_chunk", "part": "save_reference_part"}[os.environ["KILL_AT"]]
    original = getattr(RunFolder, method)

    def written_then_killed(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(RunFolder, method, written_then_killed)

sys.exit(main(sys.argv[1:]))
