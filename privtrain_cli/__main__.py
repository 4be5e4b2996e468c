import sys

from privtrain_cli.main import main

sys.exit(main())
