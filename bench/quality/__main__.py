"""`python -m bench.quality`: see `bench.quality.run`."""

from bench.quality.run import main

raise SystemExit(main())
