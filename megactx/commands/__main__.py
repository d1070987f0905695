import sys

from megactx.commands import main

sys.exit(main())
