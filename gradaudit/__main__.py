import sys

from gradaudit.cli import main

sys.exit(main())
