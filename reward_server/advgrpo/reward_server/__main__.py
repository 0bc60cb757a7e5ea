import sys

from advgrpo.reward_server.cli import main

sys.exit(main())
